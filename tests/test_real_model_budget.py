"""`make real-model` sizes a new run's steps to its time budget on this machine (scripts/real_model.py)."""
import importlib.util

import pytest

from tests.helpers import LAUNCH_VARS, ROOT

spec = importlib.util.spec_from_file_location("real_model", ROOT / "scripts" / "real_model.py")
real_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_model)


@pytest.mark.parametrize("tokens_per_s, steps", [(1000.0, 1660), (10_000.0, 1800), (1.0, 10)])
def test_budget_steps_fit_the_minutes_in_tens_up_to_the_recipe(tokens_per_s, steps):
    # 30 min x 60 s x 0.95 (5 % of a run between steps) x 1000 tokens/s / 1024 tokens per step = 1669.9
    assert real_model.budget_steps(tokens_per_s, 30, 1024, 1800) == steps


def test_only_a_new_run_without_a_steps_override_is_sized(tmp_path):
    assert real_model.sizes_steps(tmp_path, 30, ["train.lr=1e-3"])
    assert not real_model.sizes_steps(tmp_path, 0, [])
    assert not real_model.sizes_steps(tmp_path, 30, ["train.steps=50"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_10")
    assert not real_model.sizes_steps(tmp_path, 30, [])


def test_a_new_run_gets_the_steps_its_measured_rate_fits(tmp_path, monkeypatch, capsys, sotu_prefix):
    """The trainer's own steps are timed in a scratch run (removed after); config.yaml then holds fewer steps."""
    from pretrain.config import load_config, save_config

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for name in LAUNCH_VARS:            # an earlier in-process run may have left its rendezvous port here
        monkeypatch.delenv(name, raising=False)
    cfg = load_config("configs/tiny.yaml", [f"data.prefixes=[{sotu_prefix}]", "model.recycle_layers=1",
                                            "recycle.detach_base=true", "recycle.target=base", "train.steps=1000000",
                                            "recycle.init=base_last_layers",
                                            f"run.dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    real_model.size_to_budget(tmp_path, minutes=0.5)
    out = capsys.readouterr().out
    rate = float(out.split("[budget] the trainer's step runs ")[1].split(" tokens/s")[0].replace(",", ""))
    steps = load_config(str(tmp_path / "config.yaml")).train.steps
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    assert 10 <= steps < 1_000_000 and steps % 10 == 0 and f"-> train.steps={steps}" in out
    assert abs(steps - 0.5 * 60 * 0.95 * rate / tokens_per_step) <= 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]    # the scratch run is gone
