"""The training benchmarks build several engines side by side in one process (benchmarks/train_throughput.py,
benchmarks/module_training.py): they must run, and what they compare must be what they say. Tiny shapes, one
step each; the figures themselves are the benchmarks' business, not a test's."""
import json

import pytest

from tests.helpers import clean_env, cli

pytestmark = pytest.mark.slow   # whole benchmark processes

TINY = ["--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1",
        "--ffn", "128", "--seq-len", "32", "--micro-batch", "2"]
ONE_STEP = ["--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1"]


def test_train_throughput_builds_its_engines_in_one_process(tmp_path):
    """Two of our engines and the plain transformers loop, same weights: the first losses agree."""
    out = tmp_path / "train.json"
    cli("benchmarks/train_throughput.py", *TINY, *ONE_STEP, "--no-plot", "--output", str(out), env=clean_env())
    result = json.loads(out.read_text())
    assert result["loss_check"]["abs_diff"] < 1e-4, result["loss_check"]


def test_module_training_compares_its_configurations(tmp_path):
    """Four module-only steps side by side; a draft vocabulary shrinks what autograd keeps (the module's logits
    are V' wide), a bf16 base does not touch the module's saved tensors."""
    out = tmp_path / "module.json"
    cli("benchmarks/module_training.py", "--seq-len", "32", "--micro-batch", "2", *ONE_STEP, "--draft-vocab", "64",
        "--configs", "depth2_base,bf16_base,draft_vocab,recipe", "--output", str(out), env=clean_env())
    rows = json.loads(out.read_text())["configs"]
    saved = {name: r["saved_for_backward_mb"] for name, r in rows.items()}
    assert all(r["tokens_per_s_median"] > 0 for r in rows.values())
    assert saved["draft_vocab"] < 0.5 * saved["depth2_base"] and saved["recipe"] < 0.5 * saved["bf16_base"], saved
