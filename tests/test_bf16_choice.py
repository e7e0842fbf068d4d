"""recycle.base_bf16 / module_bf16 = auto (parallel/bf16_choice.py): bf16 only where this machine multiplies it faster,
measured once, decided alike on every rank, and what the engine's frozen base then runs."""
import os

import pytest
import torch

from parallel import bf16_choice


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_true_false_and_auto_are_the_settings(value):
    bf16_choice.check_setting("recycle.base_bf16", value)


@pytest.mark.parametrize("value", ["yes", 1, 0, "bf16", None])
def test_anything_else_is_one_error_naming_the_key(value):
    with pytest.raises(ValueError, match=r"recycle.module_bf16=.* must be true, false or auto"):
        bf16_choice.check_setting("recycle.module_bf16", value)


def test_true_and_false_are_kept_on_any_device():
    for device in ("cpu", "cuda"):
        assert bf16_choice.resolve(True, torch.device(device), 8, 16) is True
        assert bf16_choice.resolve(False, torch.device(device), 8, 16) is False


def test_auto_is_bf16_on_a_gpu_without_measuring(monkeypatch):
    monkeypatch.setattr(bf16_choice, "_measured", {})
    assert bf16_choice.resolve("auto", torch.device("cuda"), 8, 16) is True
    assert bf16_choice._measured == {}


@pytest.mark.parametrize("speedup, chosen", [(2.0, True), (0.6, False)])
def test_auto_on_a_cpu_follows_the_measurement(monkeypatch, speedup, chosen):
    """The measurement is recorded for (width, ffn, rows, threads); a recorded one is what `auto` follows."""
    key = (8, 16, 1024, torch.get_num_threads())
    monkeypatch.setattr(bf16_choice, "_measured", {key: speedup})
    assert bf16_choice.resolve("auto", torch.device("cpu"), 8, 16) is chosen


def test_measured_once_per_shape_and_thread_count_without_touching_the_global_rng(monkeypatch):
    monkeypatch.setattr(bf16_choice, "_measured", {})
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    first = bf16_choice.bf16_speedup(64, 128, rows=32, rounds=2)
    assert torch.equal(torch.rand(4), expected)          # decoding and training may be seeded by the global one
    assert first > 0 and list(bf16_choice._measured) == [(64, 128, 32, torch.get_num_threads())]
    bf16_choice._measured[(64, 128, 32, torch.get_num_threads())] = 123.0
    assert bf16_choice.bf16_speedup(64, 128, rows=32, rounds=2) == 123.0      # not measured again
    bf16_choice.bf16_speedup(64, 256, rows=32, rounds=2)
    assert len(bf16_choice._measured) == 2                                    # another shape is


@pytest.mark.parametrize("base, module, speedup, want", [("auto", "auto", 2.0, (True, True)),
                                                         ("auto", "auto", 0.6, (False, False)),
                                                         ("true", "auto", 0.6, (True, False)),
                                                         ("auto", "false", 2.0, (True, False))])
def test_the_engine_resolves_auto_for_the_frozen_base_and_the_module(monkeypatch, tmp_path, base, module, speedup,
                                                                      want):
    from parallel.setup import destroy
    from pretrain.config import load_config
    from pretrain.runtime import build_runtime
    from tests.helpers import LAUNCH_VARS

    cfg = load_config("configs/tiny.yaml", ["data.prefixes=[x]", "model.recycle_layers=1",
                                            "recycle.detach_base=true", f"recycle.base_bf16={base}",
                                            f"recycle.module_bf16={module}", f"run.dir={tmp_path}"])
    m = cfg.model.build()
    monkeypatch.setattr(bf16_choice, "_measured",
                        {(m.hidden_size, m.ffn_hidden_size, 1024, torch.get_num_threads()): speedup})
    launch = {k: os.environ.get(k) for k in LAUNCH_VARS}     # the in-process rendezvous sets them
    try:
        model = build_runtime(cfg).engine.module
        assert model.base_bf16 is want[0]
        assert (model.frozen.bf16, model.frozen.module_bf16) == want
    finally:
        destroy()
        for key, value in launch.items():     # later tests start their own ranks: leave them no port in use
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
