"""`--weight-layout auto|row|column`: how the Linear weights are stored in memory for decoding.

A Linear weight W is [out, in]; a checkpoint loads it row-major. `column` stores the same tensor column-major
(`W.t().contiguous().t()`: equal values, equal shape, strides (1, out)), so `F.linear(x, W)` reads W as the
contiguous [in, out] matrix of `x @ W^T`. Which one is faster is the CPU kernel's business, measured by
`benchmarks/cpu_matmul_shapes.py` and, on the real model, `benchmarks/weight_layout.py` (docs/inference.md,
"Weight layout on a CPU"): with torch 2.13 on the 2-core EPYC, in fp32 a decode step of 1 / 2 / 3 tokens is
much faster column-major (the row-major kernels for 2-3 rows are slow; a 2-token step cost ~2x a 1-token
one) and a long prefill a little slower; in bf16 the column-major LM head is ~1.4x slower at every row count.
So `auto` is `column` for fp32 on a CPU and `row` everywhere else (CUDA, bf16/fp16).

Applied once, after loading (inference/cli.py `model_from_args`), to every Linear of the model: the decoder
layers, the recyclable module and the LM head, plain or tensor-parallel. Embeddings stay row-major (they are
read by row). Training never sees it. The draft vocabulary's copy of the LM head rows follows the head's
layout (model/strides.py `like`, the storage rule itself).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from model.strides import is_column_major, restride

LAYOUTS = ("auto", "row", "column")
COLUMN_BY_DEFAULT = {("cpu", torch.float32)}       # (device type, dtype) where `auto` means column


def resolve(layout: str, device, dtype: torch.dtype) -> str:
    """'row' or 'column' for a --weight-layout value on this device and dtype."""
    if layout not in LAYOUTS:
        raise ValueError(f"--weight-layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    return "column" if (torch.device(device).type, dtype) in COLUMN_BY_DEFAULT else "row"


def _linear_types() -> tuple:
    # The tensor-parallel linears (parallel/tensor_parallel.py) exist only once megatron is imported; importing
    # it here for a plain model would cost seconds.
    megatron = sys.modules.get("megatron.core.tensor_parallel")
    if megatron is None:
        return (nn.Linear,)
    return nn.Linear, megatron.ColumnParallelLinear, megatron.RowParallelLinear


def linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights `F.linear` multiplies by: every Linear's, once each (shared ones counted once)."""
    seen, out, types = set(), [], _linear_types()
    for module in model.modules():
        if isinstance(module, types) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append(module.weight)
    return out


def layout_of(model: nn.Module) -> str:
    """'row', 'column', or 'mixed': how the model's 2-D weights other than embeddings are stored now (reports,
    tests). Independent of `linear_weights` on purpose: a Linear type that `apply` misses shows as 'mixed'."""
    embeddings = {id(m.weight) for m in model.modules() if hasattr(m, "num_embeddings")}
    kinds = {"column" if is_column_major(w) else "row" if w.is_contiguous() else "mixed"
             for w in model.parameters() if w.dim() == 2 and id(w) not in embeddings}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def apply(model: nn.Module, layout: str) -> nn.Module:
    """Store every Linear weight of `model` in `layout` ('row' or 'column'), in place; values unchanged."""
    with torch.no_grad():
        for weight in linear_weights(model):
            weight.data = restride(weight.data, layout)
    return model
