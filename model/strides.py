"""How a 2-D Linear weight is stored for decoding: the one rule behind `--weight-layout` (inference/weight_layout.py)
and the draft vocabulary's copy of the LM head's rows (model/draft_vocab.py), kept here so model/ never imports
inference/.

- row: as loaded, [out, in] contiguous.
- column: `W.t().contiguous().t()`: equal values and shape, strides (1, out).
- packed: column-major as above, and the Linear gains a oneDNN prepacked twin (`Linear.packed_weight`, an opaque
  mkldnn tensor) that its forward multiplies by; only one row on one thread still goes through the column-major
  weight, whose kernel is faster there. Why: inference/weight_layout.py.
"""
from __future__ import annotations

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


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, multiplied by `weight`'s oneDNN twin `packed` when there is one (unless x is
    one row and torch runs one thread)."""
    rows = x.numel() // x.shape[-1]
    # One row on one thread: MKL's column-major kernel is ~1.2x faster than oneDNN's; on two or more threads
    # oneDNN's is ~1.25x faster (SmolLM2 1-token steps, 2-core EPYC: 42 vs 51 ms on one thread, 43 vs 34 on two).
    if packed is None or (rows == 1 and torch.get_num_threads() == 1):
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
