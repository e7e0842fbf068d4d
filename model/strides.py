"""Row- or column-major storage of a 2-D weight: the one rule behind `--weight-layout` (inference/weight_layout.py)
and the draft vocabulary's copy of the LM head's rows (model/draft_vocab.py), kept here so model/ never imports
inference/.

Column-major is `W.t().contiguous().t()`: equal values and shape, strides (1, out).
"""
from __future__ import annotations

import torch


def restride(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same 2-D tensor stored row-major ('row') or column-major ('column')."""
    if layout == "column":
        return tensor.t().contiguous().t()
    return tensor.contiguous()


def is_column_major(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.shape[0] > 1


def like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` stored in `reference`'s layout (the draft vocabulary's rows of a column-major LM head)."""
    return restride(tensor, "column" if is_column_major(reference) else "row")
