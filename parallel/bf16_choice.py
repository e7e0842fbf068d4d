"""recycle.base_bf16 / recycle.module_bf16 = auto: bf16 arithmetic where this machine does it faster than fp32.

On a GPU bf16 always is. On a CPU it depends on the chip, and by a wide margin either way: on a 2-core Xeon with
AMX tiles a bf16 matmul of SmolLM2's shapes ran ~7x faster than fp32 and the recipe's bf16 switches made a
module-training step 2.1x faster (docs/real-model.md, v5); on one with AVX512-BF16 but no AMX (2026-12-02) the same
matmul ran at 0.58x of fp32 and the same switches made the step 1.5x *slower* (benchmarks/module_training.py:
fp32 teacher 521 tokens/s, bf16 teacher 375, bf16 teacher + module 347). So `auto` measures on a CPU: a
training-sized matmul of the model's own shapes, fp32 and bf16 in alternation, medians compared, once per
process and shape. Every rank must decide alike (tensor-parallel shards of one layer add up), so with a process
group the ranks keep bf16 only if all of them measured it faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.strides import median_seconds

_measured: dict[tuple, float] = {}


def check_setting(key: str, value):
    if not (value is True or value is False or value == "auto"):
        raise ValueError(f"{key}={value!r} must be true, false or auto (auto: bf16 where this machine multiplies "
                         "bf16 faster than fp32, measured at start)")


def bf16_speedup(width: int, ffn: int, rows: int = 1024, rounds: int = 5) -> float:
    """fp32 time / bf16 time of a [rows, width] x [width, ffn] product on this CPU (> 1: bf16 is faster)."""
    key = (width, ffn, rows, torch.get_num_threads())
    if key not in _measured:
        rng = torch.Generator().manual_seed(0)      # not the global one: training is seeded by it
        x = torch.randn(rows, width, generator=rng)
        w = torch.randn(ffn, width, generator=rng)
        pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
        seconds = median_seconds({dtype: lambda a=a, b=b: F.linear(a, b) for dtype, (a, b) in pairs.items()}, rounds)
        _measured[key] = seconds[torch.float32] / seconds[torch.bfloat16]
    return _measured[key]


def resolve(setting, device: torch.device, width: int, ffn: int) -> bool:
    """True / False as given; 'auto': bf16 on a GPU, on a CPU where `bf16_speedup` > 1 on every rank."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cpu":
        return True
    faster = torch.tensor([1 if bf16_speedup(width, ffn) > 1.0 else 0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(faster, op=torch.distributed.ReduceOp.MIN)
    return bool(faster.item())
