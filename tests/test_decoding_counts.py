"""Forward counts and tau checked against forwards counted independently: a counting wrapper around the real
model's base_step (a full forward) and module_step / draft_step (a module forward), instead of against the
decoder's own bookkeeping (tau = new tokens / full forwards is its definition and cannot fail)."""
import math
from collections import Counter

import pytest
import torch

import inference.decoding
from inference.decoding import generate_batch, greedy_generate
from model import ModelConfig, RecycleGPT
from tests.helpers import tiny_benchmark
from tests.test_inference_decoding import mirror_module, random_model

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=160, max_seq_len=96, recycle_layers=2)


class CountingModel:
    """Counts the real model's step calls on the instance (the model itself is untouched otherwise)."""

    def __init__(self, model):
        self.model, self.calls = model, Counter()
        for name in ("base_step", "module_step", "draft_step"):
            setattr(model, name, self._counting(name, getattr(model, name)))

    def _counting(self, name, step):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return step(*args, **kwargs)
        return counted

    @property
    def full(self):
        return self.calls["base_step"]

    @property
    def module(self):
        return self.calls["module_step"] + self.calls["draft_step"]


def model_with_a_useful_module(seed=0):
    """Random weights, and a module that copies the base's layers so that verify accepts some drafts (a module
    that is always wrong or always right would leave one branch of the counting untested)."""
    return mirror_module(random_model(seed, CFG))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode, draft_len", [("standard", 1), ("recycle", 1), ("verify", 1), ("verify", 3)])
def test_reported_forwards_and_tau_equal_counted_ones(mode, draft_len):
    counter = CountingModel(model_with_a_useful_module())
    n = 40
    out = generate_batch(counter.model, [[17, 3, 99, 42]], mode, n, draft_len=draft_len)
    stats = out.stats[0]
    tokens = out.rows[0].tokens
    assert len(tokens) == n == stats.new_tokens
    assert stats.full_forwards == counter.full
    assert stats.module_forwards == counter.module
    assert stats.tau == pytest.approx(len(tokens) / counter.full)
    if mode == "standard":
        assert counter.full == n and counter.module == 0
    elif mode == "recycle":
        assert counter.full == math.ceil(n / 2)
    else:
        # verify: every cycle after the prefill is one full forward that emits its accepted drafts plus one token
        cycles = counter.full - 1
        assert stats.proposed <= draft_len * cycles
        assert len(tokens) == 1 + stats.accepted + cycles
        assert 0 < stats.accepted < stats.proposed      # both branches taken


def test_verify_tau_from_counted_forwards_tracks_acceptance():
    counter = CountingModel(model_with_a_useful_module())
    s = greedy_generate(counter.model, [17, 3, 99, 42], "verify", 60).stats
    tau = s.new_tokens / counter.full
    assert tau > 1.3
    assert tau == pytest.approx(1 + s.acceptance_rate, abs=0.1)


def test_benchmark_reports_counted_forwards(tmp_path, monkeypatch):
    """inference.benchmark's per-mode forward counts against the real model's step calls, counted per mode
    (the warmup runs, with fewer new tokens, and the step-cost measurements are not counted)."""
    calls, current = Counter(), [None]
    for name, kind in (("base_step", "full"), ("module_step", "module"), ("draft_step", "module")):
        step = getattr(RecycleGPT, name)

        def counted(self, *args, _step=step, _kind=kind, **kwargs):
            if current[0] is not None:
                calls[current[0] + (_kind,)] += 1
            return _step(self, *args, **kwargs)
        monkeypatch.setattr(RecycleGPT, name, counted)
    real_generate = inference.decoding.generate_batch

    def tagged(model, prompts, mode, n, *args, **kwargs):
        current[0] = (mode, n) if n == 9 else None
        try:
            return real_generate(model, prompts, mode, n, *args, **kwargs)
        finally:
            current[0] = None
    monkeypatch.setattr(inference.decoding, "generate_batch", tagged)
    out = tmp_path / "bench.json"
    report = tiny_benchmark(out, repeats=2)
    for mode in ("standard", "recycle", "verify"):
        entry = report["modes"][mode]
        assert entry["full_forwards"] == calls[(mode, 9, "full")] / 2, mode
        assert entry["module_forwards"] == calls[(mode, 9, "module")] / 2, mode
        assert entry["tau"] == pytest.approx(entry["new_tokens"] / (calls[(mode, 9, "full")] / 2)), mode
    assert calls[("standard", 9, "full")] == 2 * 9 and calls[("recycle", 9, "full")] == 2 * 5
