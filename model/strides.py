"""How a 2-D Linear weight is stored for decoding: the one rule behind `--weight-layout` (inference/weight_layout.py)
and the draft vocabulary's copy of the LM head's rows (model/draft_vocab.py), kept here so model/ never imports
inference/.

- row: as loaded, [out, in] contiguous.
- column: `W.t().contiguous().t()`: equal values and shape, strides (1, out).
- packed: column-major as above, and the Linear gains a oneDNN prepacked twin (`Linear.packed_weight`, an opaque
  mkldnn tensor) that its forward multiplies by. For 1-3 rows the column-major weight's kernel or the twin's for
  4 rows is sometimes the faster one, so that choice is measured for the model (`FewRowKernel`). Why:
  inference/weight_layout.py.
"""
from __future__ import annotations

import functools
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


FEW_ROWS = "few_row_kernel"  # the attribute of a packed Linear that holds its model's FewRowKernel


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _onednn_padded(x: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    """oneDNN's kernel for the PACK_ROWS rows the twin was packed for, on x padded with zero rows (outputs dropped)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    out = _onednn(torch.cat([flat, flat.new_zeros(PACK_ROWS - rows, flat.shape[1])]), packed, bias)[:rows]
    return out.reshape(*x.shape[:-1], out.shape[-1])


FEW_ROW_KERNELS = {
    "mkl": lambda x, weight, packed, bias: nn.functional.linear(x, weight, bias),    # the column-major weight
    "onednn": lambda x, weight, packed, bias: _onednn(x, packed, bias),              # the packed twin
    "padded": lambda x, weight, packed, bias: _onednn_padded(x, packed, bias),       # the twin, PACK_ROWS rows
}
# Before a measurement: oneDNN for one row; for 2-3, its kernel for the packed row count (a 2-token step of SmolLM2
# took 1.5x a 1-token one on 2026-11-30, padded to 4 rows 1.1x).
UNMEASURED = {1: "onednn", 2: "padded", 3: "padded"}


class FewRowKernel:
    """Which kernel multiplies 1 to PACK_ROWS - 1 rows (a decode step, a verify step of k + 1 <= 3 tokens) by one
    model's packed Linears.

    None always wins, and the margins decide speedups: a SmolLM2 1-token step on a 2-core EPYC took 42 (MKL) vs 51 ms
    (oneDNN) on one thread on 2026-12-01 and 33-37 vs 27-32 ms on 2026-12-02; on a 2-core Xeon without AMX
    (2026-12-02, two threads) 29.0 (MKL) vs 34.8 ms (oneDNN), and for 2 rows MKL 34.8, oneDNN 36.9, padded 39.5 ms.
    `standard` must get its fastest kernel too, or every speedup over it is inflated. A kernel timed on one weight
    in a loop misleads (the weight stays in cache; in a step every weight comes from memory), so it is measured as
    a step is run: the rows through every Linear of the model in order, the kernels in alternation, medians
    compared; once per thread count and row count, at the first product of that many rows."""

    def __init__(self, linears: list[nn.Module]):
        self.linears = linears
        self.choice: dict[tuple[int, int], str] = {}

    def __call__(self, rows: int) -> str:
        key = (torch.get_num_threads(), rows)
        if key not in self.choice:
            self.choice[key] = self.measure(rows)
        return self.choice[key]

    def measure(self, rows: int, rounds: int = 7) -> str:
        rng = torch.Generator().manual_seed(0)            # not the global one: decoding may be seeded by it
        xs = [torch.randn(rows, m.weight.shape[1], dtype=m.weight.dtype, generator=rng) for m in self.linears]

        def step(run):
            for m, x in zip(self.linears, xs):
                run(x, m.weight, getattr(m, PACKED), m.bias)
        seconds = median_seconds({name: functools.partial(step, run) for name, run in FEW_ROW_KERNELS.items()}, rounds)
        return min(seconds, key=seconds.get)


def median_seconds(runs: dict, rounds: int) -> dict:
    """{name: median seconds of `runs[name]()`}, the runs timed in alternation (a change of machine load hits all
    alike) for `rounds` rounds after one that warms up; under no_grad."""
    seconds = {name: [] for name in runs}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if round_:
                    seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, few_rows: FewRowKernel | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, multiplied by `weight`'s oneDNN twin `packed` when there is one; fewer than
    PACK_ROWS rows by the kernel `few_rows` measured fastest for the model (UNMEASURED's without one)."""
    if packed is None:
        return nn.functional.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows >= PACK_ROWS:
        return _onednn(x, packed, bias)
    kernel = few_rows(rows) if few_rows is not None else UNMEASURED[rows]
    return FEW_ROW_KERNELS[kernel](x, weight, packed, bias)


def packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward with the prepacked twin (bound to a Linear by inference/weight_layout.py)."""
    return linear(x, self.weight, getattr(self, PACKED), self.bias, getattr(self, FEW_ROWS, None))


def like(tensor: torch.Tensor, head: nn.Module) -> tuple:
    """`tensor` (rows of `head.weight`) stored the way `head` multiplies, as the arguments after x of `linear`
    (weight, packed twin or None, bias None, the head's FewRowKernel or None): the draft vocabulary's rows of the
    LM head, column- or row-major and packed as the head is."""
    dense = restride(tensor, "column" if is_column_major(head.weight) else "row")
    packed = getattr(head, PACKED, None) is not None
    return dense, (pack(dense) if packed else None), None, (getattr(head, FEW_ROWS, None) if packed else None)
