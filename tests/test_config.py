"""pretrain.config: the layout rules come from parallel.dims (one home each), removed keys, the data schema."""
import pytest

from data_prep.datasets import DataConfig
from pretrain.config import ConfigError, load_config

BASE = ["data.prefixes=[x]"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.zero_stage=4"], "parallel.zero_stage=4; valid: 0, 1, 2, 3"),
    (["parallel.zero_stage=2", "parallel.pp=2"], "supports ZeRO stage 0 or 1 only"),
    (["train.precision=fp16"], "train.precision='fp16'; valid: auto, bf16, fp32"),
    (["checkpoint.load=/runs/other"], "checkpoint.load was never used and has been removed"),
    (["data.num_workers=4"], "data.num_workers was never used and has been removed"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/tiny.yaml", BASE + overrides)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML reads `3e-4` as a string (YAML 1.1); a config must mean what it says, and other text still errors."""
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\n  min_lr: 2E-5\n")
    cfg = load_config(str(tmp_path / "c.yaml"), BASE)
    assert (cfg.train.lr, cfg.train.min_lr) == (3e-4, 2e-5)
    assert load_config("configs/tiny.yaml", BASE + ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.lr='fast' has type str; expected float"):
        load_config("configs/tiny.yaml", BASE + ["train.lr=fast"])


def test_a_run_saved_with_the_removed_keys_still_loads(tmp_path):
    """config.yaml of a run made before the keys were removed holds them at their defaults."""
    import yaml
    old = load_config("configs/tiny.yaml", BASE).to_dict()
    old["checkpoint"]["load"] = ""
    old["data"]["num_workers"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_config(str(tmp_path / "config.yaml"))
    assert cfg == load_config("configs/tiny.yaml", BASE)
    assert isinstance(cfg.data, DataConfig)   # the data section is data_prep's schema itself


def test_saved_optimizer_names_win_over_the_rebuilt_order():
    """Tags save the optimizer's parameter names (pretrain.checkpoint.save); the rebuilt order is only for tags
    written before that."""
    from model import ModelConfig
    from parallel.ds_checkpoint import _torch_optimizer_names

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      ffn_hidden_size=32, max_seq_len=16, recycle_layers=1)
    rebuilt = _torch_optimizer_names(cfg, 1, 0, [11, 8])            # an old tag: matrices, then vectors
    assert rebuilt is not None and len(rebuilt) == 19
    saved = [list(reversed(rebuilt[:11])), list(reversed(rebuilt[11:]))]
    assert _torch_optimizer_names(cfg, 1, 0, [11, 8], saved) == saved[0] + saved[1]
    assert _torch_optimizer_names(cfg, 1, 0, [11, 8], [saved[0], saved[1][:-1]]) == rebuilt   # sizes disagree
