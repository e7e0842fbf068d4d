"""The benchmark's tensor-parallel parts: per-rank memory, the TP scaling line, and the memory plan.

    torchrun --nproc-per-node 2 -m inference.benchmark --preset 1.3b --random-init --tp 2 \\
        --baseline tp1.json --output tp2.json       # tp2.png gains tokens/s against tp, per mode
    python -m inference.benchmark --preset 13b --random-init --dtype bf16 --memory-plan --output plan.json
"""
from __future__ import annotations

import json
from pathlib import Path

from inference import tp_loading
from inference.cli import UsageError

GIB = 2 ** 30
CARDS_GIB = (24, 40, 80)      # consumer card, A100-40GB, A100/H100-80GB


def rank_memory(load_peak: int) -> list[dict]:
    """On every rank: [{rank, peak_rss_gib after loading, at the end}] of all ranks (collective)."""
    mine = {"peak_rss_after_load_gib": load_peak / GIB, "peak_rss_gib": tp_loading.peak_rss_bytes() / GIB}
    return [{"rank": r, **m} for r, m in enumerate(tp_loading.gather(mine))]


def read_baseline(path: str | None) -> dict | None:
    """A previous benchmark report (another --tp, same model) for the scaling line; checked before loading."""
    if path is None:
        return None
    p = Path(path)
    try:
        report = json.loads(p.read_text())
        report["modes"], report["tp"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--baseline {path}: not a benchmark report ({err}); pass a FILE.json written by "
                         "inference.benchmark") from None
    return report


def scaling(report: dict, baseline: dict | None) -> dict:
    """{tp: {mode: tokens/s}} of this run and the baseline's (and the baseline's own baselines)."""
    out = {}
    if baseline is not None:
        if baseline.get("config") != report["config"] or baseline.get("dtype") != report["dtype"]:
            raise UsageError("--baseline was measured on another model or dtype; compare the same --preset/--model "
                             "and --dtype")
        out.update(baseline.get("tp_scaling") or {})
        out[str(baseline["tp"])] = {m: r["tokens_per_s"] for m, r in baseline["modes"].items()}
    out[str(report["tp"])] = {m: r["tokens_per_s"] for m, r in report["modes"].items()}
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def print_tp_lines(report: dict):
    print("peak RSS per rank: " + ", ".join(f"rank {m['rank']} {m['peak_rss_gib']:.2f} GiB (after loading "
                                              f"{m['peak_rss_after_load_gib']:.2f})" for m in report["per_rank"]))
    if len(report["tp_scaling"]) > 1:
        print("tokens/s by tp: " + "; ".join(f"tp {t}: " + ", ".join(f"{m} {v:.2f}" for m, v in row.items())
                                            for t, row in report["tp_scaling"].items()))


def plot_scaling(ax, report: dict):
    points = report["tp_scaling"]
    tps = [int(t) for t in points]
    for mode in report["modes"]:
        ys = [points[t].get(mode) for t in points]
        ax.plot(tps, ys, marker="o", label=mode)
    ax.set_xticks(tps)
    ax.set_xlabel("tensor-parallel ranks")
    ax.set_ylabel("tokens/s")
    mem = ", ".join(f"{m['peak_rss_gib']:.1f}" for m in report["per_rank"])
    ax.set_title(f"TP scaling (peak RSS per rank at tp {report['tp']}: {mem} GiB)", fontsize=9)
    ax.legend(fontsize=8)


def memory_plan(cfg, dtype, cache_len: int, tps=(1, 2, 4, 8)) -> dict:
    """Per-rank bytes (weights + KV caches, batch 1) for each TP that divides the model, and verdicts for this
    host's free memory and common card sizes."""
    import torch

    from inference.loading import memory_available

    here = memory_available(torch.device("cpu"))
    rows = {}
    for tp in tps:
        try:
            tp_loading.check_tp(cfg, tp)
        except tp_loading.TPError as err:
            rows[str(tp)] = {"error": str(err)}
            continue
        need = tp_loading.bytes_per_rank(cfg, dtype, cache_len, tp)
        rows[str(tp)] = {"per_rank_gib": need / GIB, "all_ranks_gib": tp * need / GIB,
                         "fits_this_host": tp * need <= 0.9 * here,
                         **{f"fits_{c}gib_cards": need <= 0.9 * c * GIB for c in CARDS_GIB}}
    return {"host_free_gib": here / GIB, "cache_len": cache_len, "tp": rows}


def print_plan(name: str, dtype: str, plan: dict):
    print(f"{name} in {dtype}: memory per rank (weights + KV caches for {plan['cache_len']} positions, batch 1); "
          f"this host has {plan['host_free_gib']:.1f} GiB free")
    print(f"{'tp':>4}{'per rank':>11}{'all ranks':>11}{'this host':>11}" + "".join(f"{f'{c} GiB card':>13}" for c in CARDS_GIB))
    for tp, row in plan["tp"].items():
        if "error" in row:
            print(f"{tp:>4}  {row['error']}")
            continue
        yes = lambda ok: "fits" if ok else "no"
        print(f"{tp:>4}{row['per_rank_gib']:>9.1f}Gi{row['all_ranks_gib']:>9.1f}Gi{yes(row['fits_this_host']):>11}"
              + "".join(f"{yes(row[f'fits_{c}gib_cards']):>13}" for c in CARDS_GIB))
