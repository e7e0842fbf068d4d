"""`--weight-layout auto|row|column|packed`: how the Linear weights are stored in memory for decoding.

A Linear weight W is [out, in]; a checkpoint loads it row-major. `column` stores the same tensor column-major
(`W.t().contiguous().t()`: equal values, equal shape, strides (1, out)), so `F.linear(x, W)` reads W as the
contiguous [in, out] matrix of `x @ W^T`. `packed` stores W column-major and gives each Linear a oneDNN
prepacked twin that its forward multiplies by (model/strides.py, the storage rule itself). Which one is
faster is the CPU kernel's business, measured by `benchmarks/cpu_matmul_shapes.py` and, on the real model,
`benchmarks/weight_layout.py` (docs/inference.md, "Weight layout on a CPU"), with torch 2.13 on the 2-core EPYC
in fp32:
- row: the MKL kernels for 2-3 rows are slow (a 2-token step cost ~2x a 1-token one);
- column: a 1-token step ~1.3x faster than row, but a step of k + 1 tokens still costs ~(k + 1)/2 1-token ones;
- packed: oneDNN's prepacked kernels read each weight once for a few rows (2-3 rows padded to the 4 the twin
  was packed for, where that measures faster), so a step of 2-4 tokens of SmolLM2 costs 1.13-1.14 1-token steps
  on one thread and 1.03-1.11 on two, and a 32-token prefill takes 0.6-0.8x the time. For one row neither kernel
  always wins: on one thread oneDNN was ~1.2x slower than column's kernel on 2026-12-01 and ~1.2x faster on
  2026-12-02 (on two, ~1.25x faster both days; 1.2x slower on a Xeon without AMX). Which kernel 1-3 rows take
  (MKL's for the column-major weight, oneDNN's, or oneDNN's for 4 rows on padded input) is therefore measured for
  the model, once per thread count and row count, at the first such product (model/strides.py `FewRowKernel`):
  `standard` must get the faster kernel too, or every speedup over it is inflated. The multi-token steps of
  `verify` and `recycle` become nearly free. It costs a
  second copy of every Linear weight in memory, and megatron's tensor-parallel linears have no packed path.
In bf16 row-major is best (its oneDNN kernels are already flat in the row count; the column-major LM head is
~1.4x slower). So `auto` is `packed` for fp32 on a CPU with one tensor-parallel rank (`column` with more) and `row`
everywhere else (CUDA, bf16/fp16).

Applied once, after loading (inference/cli.py `model_from_args`), to every Linear of the model: the decoder
layers, the recyclable module and the LM head, plain or tensor-parallel (packed: plain only). Embeddings stay
row-major (they are read by row). Training never sees it. The draft vocabulary's copy of the LM head rows
follows the head's layout (model/strides.py `like`).
"""
from __future__ import annotations

import sys
import types

import torch
from torch import nn

from model.strides import FEW_ROWS, PACKED, FewRowKernel, can_pack, is_column_major, pack, packed_forward, restride

LAYOUTS = ("auto", "row", "column", "packed")


def resolve(layout: str, device, dtype: torch.dtype, tp: int = 1) -> str:
    """'row', 'column' or 'packed' for a --weight-layout value on this device and dtype, with `tp` ranks."""
    if layout not in LAYOUTS:
        raise ValueError(f"--weight-layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    on_cpu = torch.device(device).type == "cpu"
    if layout == "packed" and not (on_cpu and tp == 1 and can_pack()):
        raise ValueError("--weight-layout packed needs a CPU with oneDNN (torch.backends.mkldnn) and --tp 1; "
                         "use column or row")
    if layout != "auto":
        return layout
    if on_cpu and dtype == torch.float32:
        return "packed" if tp == 1 and can_pack() else "column"
    return "row"


def _linear_types() -> tuple:
    # The tensor-parallel linears (parallel/tensor_parallel.py) exist only once megatron is imported; importing
    # it here for a plain model would cost seconds.
    megatron = sys.modules.get("megatron.core.tensor_parallel")
    if megatron is None:
        return (nn.Linear,)
    return nn.Linear, megatron.ColumnParallelLinear, megatron.RowParallelLinear


def linears(model: nn.Module) -> list[nn.Module]:
    """Every Linear whose weight `F.linear` multiplies by, once per weight (a tied one counted once)."""
    seen, out, types_ = set(), [], _linear_types()
    for module in model.modules():
        if isinstance(module, types_) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append(module)
    return out


def linear_weights(model: nn.Module) -> list[nn.Parameter]:
    return [module.weight for module in linears(model)]


def layout_of(model: nn.Module) -> str:
    """'row', 'column', 'packed', or 'mixed': how the model's 2-D weights other than embeddings are stored now
    (reports, tests). Independent of `linears` on purpose: a Linear type that `apply` misses shows as 'mixed'."""
    embeddings = {id(m.weight) for m in model.modules() if hasattr(m, "num_embeddings")}
    packed = {id(m.weight) for m in model.modules() if getattr(m, PACKED, None) is not None}
    kinds = {"packed" if id(w) in packed and is_column_major(w) else "column" if is_column_major(w) else "row"
             if w.is_contiguous() else "mixed" for w in model.parameters() if w.dim() == 2 and id(w) not in embeddings}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def twin_bytes(model: nn.Module) -> int:
    """The memory `packed` adds: one more copy of every Linear weight."""
    return sum(w.numel() * w.element_size() for w in linear_weights(model))


def apply_flag(model: nn.Module, layout: str, device, dtype: torch.dtype, tp: int = 1) -> str:
    """Resolve a --weight-layout value for this loaded model and store its weights that way; returns the layout.
    `auto` packs only when the twins fit in half of the free memory (else column); asked-for `packed` that does
    not fit in 90 % of it is refused."""
    from inference.loading import memory_available

    chosen = resolve(layout, device, dtype, tp)
    if chosen == "packed":
        need, have = twin_bytes(model), memory_available(torch.device("cpu"))
        if need > (0.9 if layout == "packed" else 0.5) * have:
            if layout == "packed":
                raise ValueError(f"--weight-layout packed needs {need / 2**30:.1f} GiB more for the packed copies of "
                                 f"the weights, but {have / 2**30:.1f} GiB is free; use column")
            chosen = "column"
    apply(model, chosen)
    return chosen


def apply(model: nn.Module, layout: str) -> nn.Module:
    """Store every Linear weight of `model` in `layout` ('row', 'column' or 'packed'), in place; values unchanged.
    Applying another layout later undoes a packed one."""
    with torch.no_grad():
        packed = []
        for module in linears(model):
            if PACKED in vars(module):
                del module.packed_weight, module.forward, module.few_row_kernel   # back to nn.Linear's forward
            module.weight.data = restride(module.weight.data, "column" if layout == "packed" else layout)
            if layout == "packed":
                if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
                    raise ValueError(f"--weight-layout packed: {type(module).__name__} on "
                                     f"{module.weight.device.type} has no packed path; use column or row")
                setattr(module, PACKED, pack(module.weight))
                module.forward = types.MethodType(packed_forward, module)
                packed.append(module)
        if packed:
            few_rows = FewRowKernel(packed)                   # measured at the first product of 1, 2, 3 rows
            for module in packed:
                setattr(module, FEW_ROWS, few_rows)
    return model
