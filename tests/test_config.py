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
