"""The generate/benchmark commands: one-line errors with exit 2, a real run, the benchmark report, HF loading."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.decoding import greedy_generate
from inference.loading import load_model_dir
from model import ModelConfig, RecycleGPT
from tests.helpers import tiny_benchmark

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("argv, expected", [
    (["inference.generate", "--model", "/no/such/run", "--prompt", "x"], "no such directory"),
    (["inference.generate", "--preset", "tiny", "--random-init", "--prompt", "x", "--mode", "beam"],
     "invalid choice: 'beam'"),
    (["inference.generate", "--preset", "tiny", "--prompt", "x"], "add --random-init"),
    (["inference.generate", "--preset", "tiny", "--random-init", "--prompt", "x", "--max-new-tokens", "999"],
     "exceeds the model's context"),
    (["inference.benchmark", "--preset", "tiny", "--random-init", "--modes", "standard,fast",
      "--output", "/tmp/x.json"], "unknown mode(s) ['fast']"),
    (["inference.generate", "--preset", "tiny", "--random-init", "--prompt", "x", "--draft-len", "0"],
     "--draft-len '0'"),
    (["inference.generate", "--preset", "tiny", "--random-init", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["inference.generate", "--preset", "tiny", "--random-init", "--batch-file", "/no/such.txt"], "--batch-file"),
    (["inference.generate", "--preset", "tiny", "--random-init", "--prompt", "x", "--draft-vocab", "/no/dv"],
     "--draft-vocab"),
    (["inference.benchmark", "--preset", "tiny", "--random-init", "--compare-draft-vocab", "--output", "/tmp/x.json"],
     "--compare-draft-vocab needs"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected):
    r = run(*argv)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_runs_on_a_random_preset():
    r = run("inference.generate", "--preset", "tiny", "--random-init", "--prompt", "The union is",
            "--mode", "verify", "--max-new-tokens", "6", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The union is")
    assert "[verify] 6 tokens" in r.stderr and "tokens/s" in r.stderr


def test_benchmark_writes_json_and_png(tmp_path):
    out = tmp_path / "bench.json"
    report = tiny_benchmark(out)
    assert set(report["modes"]) == {"standard", "recycle", "verify"}
    assert report["modes"]["standard"]["full_forwards"] == 9
    assert report["modes"]["recycle"]["full_forwards"] == 5
    assert report["modes"]["verify"]["identical_to_standard"] is True
    # forward counts against the model's own step calls: tests/test_decoding_counts.py
    assert out.with_suffix(".png").stat().st_size > 1000


def test_benchmark_draft_lens_batch_and_sampling(tmp_path):
    report = tiny_benchmark(tmp_path / "bench.json", "--modes", "standard,verify", "--draft-len", "1,3,auto",
                            "--max-draft-len", "2", "--batch-size", "2", "--temperature", "0.7", repeats=2)
    modes = report["modes"]
    assert set(modes) == {"standard", "verify_k1", "verify_k3", "verify_auto"}
    assert [modes[m]["draft_len"] for m in ("verify_k1", "verify_k3")] == [1, 3]
    assert modes["verify_auto"]["draft_len_auto"] and 1 <= modes["verify_auto"]["draft_len"] <= 2
    for m in modes.values():
        assert m["temperature"] == 0.7 and m["batch_size"] == 2 and "speedup_best" in m
        assert m["new_tokens"] == 2 * 9
    assert modes["verify_k3"]["identical_to_standard"] is None      # sampled: no token-for-token claim
    costs = report["step_costs"]
    assert set(costs["cost_ratio"]) == {"1", "2", "3", "4"}
    k = 3
    assert modes["verify_k3"]["predicted_speedup"] == pytest.approx(
        modes["verify_k3"]["tau_cycle"] / (costs["cost_ratio"][str(k + 1)] + k * costs["f"]
                                           + (k - 1) * costs["f_refresh"]))


@pytest.mark.slow
def test_generate_batch_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The union is\n\nWe the people of the United States\n")
    r = run("inference.generate", "--preset", "tiny", "--random-init", "--batch-file", str(prompts), "--mode",
            "verify", "--draft-len", "2", "--max-new-tokens", "5", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.strip().split("\n\n")
    assert len(blocks) == 2 and blocks[0].startswith("The union is") and blocks[1].startswith("We the people")
    assert r.stderr.count("[verify] 5 tokens") == 2 and "[batch] 10 tokens" in r.stderr


def test_hf_dir_round_trip(tmp_path):
    """An HF-style export (Llama weights + the module's own file) loads back to the same greedy output."""
    from safetensors.torch import save_file

    from pretrain.hf_convert import llama_config_kwargs, to_hf

    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, max_seq_len=64, recycle_layers=1)
    torch.manual_seed(0)
    model = RecycleGPT(cfg).eval()
    base, module = to_hf(cfg, model.state_dict())
    save_file(base, str(tmp_path / "model.safetensors"))
    save_file(module, str(tmp_path / "recycle_module.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(llama_config_kwargs(cfg)))
    loaded, tokenizer = load_model_dir(tmp_path, torch.float32, "cpu")
    assert tokenizer is None and loaded.cfg == cfg
    for mode in ("standard", "verify", "recycle"):
        assert greedy_generate(loaded, [1, 2, 3], mode, 10).tokens == greedy_generate(model, [1, 2, 3], mode, 10).tokens
