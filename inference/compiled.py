"""`--compile MODE`: the decode steps (full model, module) through `torch.compile` (DESIGN.md §2c).

At batch 1 a decode step is a few small matmuls per layer; on a GPU the Python and kernel-launch overhead
around them dominates. `reduce-overhead` replays the steps as CUDA graphs; `default` only fuses kernels.
The KV caches are preallocated (model/kv_cache.py), so the tensors a step writes never move; the cache
length is a Python int that torch.compile treats as a dynamic size (`dynamic=True`), so one graph serves
every length instead of one per position. Off by default: on a CPU it was measured slower (docs/inference.md,
"Compiled decode steps"), and the first call of each step shape pays the compilation.

Every rank of a tensor-parallel run compiles the same steps; the all-reduces inside megatron's row-parallel
layers stay outside the captured graphs (graph breaks) on gloo.
"""
from __future__ import annotations

MODES = ("off", "default", "reduce-overhead")


def compile_steps(model, mode: str = "off"):
    """Replace `model.base_step` / `model.module_step` with compiled versions (in place; returns the model)."""
    if mode == "off":
        return model
    if mode not in MODES:
        raise ValueError(f"--compile {mode!r}; valid: {', '.join(MODES)}")
    import torch

    options = {"mode": mode, "dynamic": True}
    model.base_step = torch.compile(model.base_step, **options)
    if model.recycle is not None:
        model.module_step = torch.compile(model.module_step, **options)
    return model
