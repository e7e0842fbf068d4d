"""How a 2-D Linear weight is stored for decoding: the one rule behind `--weight-layout` (inference/weight_layout.py)
and the draft vocabulary's copy of the LM head's rows (model/draft_vocab.py), kept here so model/ never imports
inference/.

- row: as loaded, [out, in] contiguous.
- column: `W.t().contiguous().t()`: equal values and shape, strides (1, out).
- packed: column-major as above, and the Linear gains a oneDNN prepacked twin (`Linear.packed_weight`, an opaque
  mkldnn tensor) that its forward multiplies by. For one row the column-major weight's kernel is sometimes the
  faster one, so that choice is measured (`one_row_packed`). Why: inference/weight_layout.py.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

PACKED = "packed_weight"     # the attribute of a Linear that holds its prepacked twin
# oneDNN chooses the packed format for an expected row count; 4 and 8 measured the same from 1 to 64 rows
# (a decode step, a verify step of k + 1 tokens, a prefill), 1 slower from 2 rows on.
PACK_ROWS = 4


def restride(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same 2-D tensor stored row-major ('row') or column-major ('column')."""
    if layout == "column":
        return tensor.t().contiguous().t()
    return tensor.contiguous()


def is_column_major(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.shape[0] > 1


def can_pack() -> bool:
    return torch.backends.mkldnn.is_available()


def pack(tensor: torch.Tensor) -> torch.Tensor:
    """oneDNN's prepacked copy of a [out, in] CPU weight, for `linear` only (it cannot be indexed or saved)."""
    return torch.ops.mkldnn._reorder_linear_weight(tensor.detach().contiguous(), PACK_ROWS)


# (torch threads, out, in) -> whether oneDNN's kernel multiplies one row by that weight faster than MKL's
# column-major one. Neither always wins: SmolLM2 1-token steps on the 2-core EPYC took 42 (MKL) vs 51 ms (oneDNN)
# on one thread on 2026-12-01, and 37 vs 30 ms on 2026-12-02 (on two threads oneDNN won both days).
ONE_ROW_PACKED: dict[tuple, bool] = {}


def one_row_packed(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias) -> bool:
    """Whether one row goes through the twin: measured once per thread count and weight shape, on first use."""
    key = (torch.get_num_threads(), *weight.shape)
    if key not in ONE_ROW_PACKED:
        ONE_ROW_PACKED[key] = packed_is_faster(x, weight, packed, bias)
    return ONE_ROW_PACKED[key]


def packed_is_faster(x, weight, packed, bias, rounds: int = 15) -> bool:
    """Both one-row kernels timed in alternation (so a busy moment slows both), medians compared."""
    kernels = {"mkl": lambda: nn.functional.linear(x, weight, bias),
               "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")}
    seconds = {name: [] for name in kernels}
    with torch.no_grad():
        for name, run in kernels.items():               # warm-up: first calls allocate
            run()
        for _ in range(rounds):
            for name, run in kernels.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    return statistics.median(seconds["onednn"]) < statistics.median(seconds["mkl"])


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, multiplied by `weight`'s oneDNN twin `packed` when there is one (for one row
    only where that kernel measured faster, `one_row_packed`)."""
    rows = x.numel() // x.shape[-1]
    if packed is None or (rows == 1 and not one_row_packed(x, weight, packed, bias)):
        return nn.functional.linear(x, weight, bias)
    if rows == 1 or rows >= PACK_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    # 2-3 rows: oneDNN's kernel for the packed row count is faster than its own for fewer rows (a 2-token step of
    # SmolLM2 took 1.5x a 1-token one, padded to 4 rows 1.1x), so pad with zero rows and drop their outputs.
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(PACK_ROWS - rows, flat.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(padded, packed, bias, "none", [], "")[:rows]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with the prepacked twin (bound to a Linear by inference/weight_layout.py)."""
    return linear(x, self.weight, getattr(self, PACKED), self.bias)


def like(tensor: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`tensor` (rows of `head.weight`) stored the way `head` multiplies, as (weight, packed twin or None) for
    `linear`: the draft vocabulary's rows of the LM head, column- or row-major and packed as the head is."""
    dense = restride(tensor, "column" if is_column_major(head.weight) else "row")
    return dense, (pack(dense) if getattr(head, PACKED, None) is not None else None)
