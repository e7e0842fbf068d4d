"""`make real-model` sizes a new run's steps to its time budget on this machine (scripts/real_model.py)."""
import importlib.util

import pytest

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("real_model", ROOT / "scripts" / "real_model.py")
real_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_model)


@pytest.mark.parametrize("tokens_per_s, steps", [(1000.0, 1230), (10_000.0, 1800), (1.0, 10)])
def test_budget_steps_fit_the_minutes_in_tens_up_to_the_recipe(tokens_per_s, steps):
    # 30 min x 60 s x 1000 tokens/s x 0.7 (the trainer's share) / 1024 tokens per step = 1230.5
    assert real_model.budget_steps(tokens_per_s, 30, 1024, 1800) == steps


def test_only_a_new_run_without_a_steps_override_is_sized(tmp_path):
    assert real_model.sizes_steps(tmp_path, 30, ["train.lr=1e-3"])
    assert not real_model.sizes_steps(tmp_path, 0, [])
    assert not real_model.sizes_steps(tmp_path, 30, ["train.steps=50"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_10")
    assert not real_model.sizes_steps(tmp_path, 30, [])


def test_a_new_run_gets_the_steps_its_measured_rate_fits(tmp_path, monkeypatch, capsys):
    """The real benchmark measures the run's own step (tiny preset here); config.yaml then holds fewer steps."""
    import json

    from pretrain.config import load_config, save_config

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    cfg = load_config("configs/tiny.yaml", ["data.prefixes=[x]", "model.recycle_layers=1", "recycle.detach_base=true",
                                            "recycle.target=base", "train.steps=1000000", "train.global_batch_size=4",
                                            "train.micro_batch_size=4", "train.seq_length=256", f"run.dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    real_model.size_to_budget(tmp_path, minutes=0.5)
    rate = json.loads((tmp_path / "train_rate.json").read_text())["configs"]["like"]["tokens_per_s_median"]
    steps = load_config(str(tmp_path / "config.yaml")).train.steps
    assert 10 <= steps < 1_000_000 and steps % 10 == 0
    assert abs(steps - 0.5 * 60 * rate * real_model.TRAINER_SHARE / 1024) <= 10
    assert f"-> train.steps={steps}" in capsys.readouterr().out
