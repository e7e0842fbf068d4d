"""Why a 2-token full step costs about 2x a 1-token one on a CPU (docs/inference.md, "Step costs on a CPU").

Times `F.linear(x, W)` with W [out, in] stored row-major (`row`, how a checkpoint loads), column-major
(`column`: `W.t().contiguous().t()`, the same tensor; `--weight-layout column`, inference/weight_layout.py) and
oneDNN-prepacked (`packed`, model/strides.py) for M = 1 .. 8 rows of x, interleaved, medians, at one thread, in fp32 or bf16. On the 2-core EPYC
development machine with torch 2.13 in fp32, `row` on the LM head's shape takes ~2x at M = 2 and ~3x at M = 3
but only ~1.8x at M = 4, while `column` takes ~1.1x at M = 2: small-M products are not weight-bound in the
row layout. This is the kernel side of c(2)/c(1) ~ 1.9 in the benchmark's step costs.

    python benchmarks/cpu_matmul_shapes.py --dtype fp32 --output runs/bench/matmul_shapes_fp32.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.strides import linear, pack  # noqa: E402

SHAPES = {"attention q/o": (576, 576), "mlp up": (576, 1536), "mlp down": (1536, 576), "lm head": (576, 49152)}


def timings(d_in: int, d_out: int, rows: list[int], reps: int, dtype: torch.dtype) -> dict:
    weight = torch.randn(d_out, d_in, dtype=dtype)
    weight_col = weight.t().contiguous().t()
    xs = {m: torch.randn(1, m, d_in, dtype=dtype) for m in rows}
    weight_packed = pack(weight)            # as --weight-layout packed multiplies: column-major for one row
    kinds = {"row": lambda x: F.linear(x, weight), "column": lambda x: F.linear(x, weight_col),
             "packed": lambda x: linear(x, weight_col, weight_packed)}
    times = {(k, m): [] for k in kinds for m in rows}
    for _ in range(reps):
        for kind, fn in kinds.items():
            for m in rows:
                start = time.perf_counter()
                fn(xs[m])
                times[(kind, m)].append(time.perf_counter() - start)
    med = {key: statistics.median(v[1:]) for key, v in times.items()}
    unit = med[("row", 1)]
    return {kind: {m: med[(kind, m)] / unit for m in rows} for kind in kinds} | {"row_m1_ms": unit * 1e3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,3,4,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--output", required=True, metavar="FILE.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    report = {"torch": torch.__version__, "threads": args.threads, "dtype": args.dtype, "shapes": {}}
    for name, (d_in, d_out) in SHAPES.items():
        reps = 12 if d_out * d_in > 1e7 else 200
        t = timings(d_in, d_out, rows, reps, dtype)
        report["shapes"][name] = {"in": d_in, "out": d_out, **t}
        for kind in ("row", "column", "packed"):
            print(f"{name:14s} {kind:7s} " + "  ".join(f"M={m}: {t[kind][m]:.2f}" for m in rows)
                  + f"   (units of row at M=1 = {t['row_m1_ms']:.3f} ms)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
