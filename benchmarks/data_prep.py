"""Tokenization throughput and memory of `python -m data_prep.tokenize` (a script, not a test).

    python benchmarks/data_prep.py --output bench_data_prep.json [--tokenizer assets/tokenizers/gpt2]

Builds a corpus of at least --size-mb MB of text (.jsonl.zst) by repeating the bundled SOTU and Brown texts,
and one --scale times larger, then tokenizes each with 1 and 2 workers in a fresh process and reports:
tokens/s over the tokenizing phase (startup imports excluded; wall time including them is reported too),
tokens per CPU-second of the whole process tree (a figure that other load on the machine barely moves),
and peak memory of the process tree (sum of RSS of the main process and its workers, sampled every 0.1 s).
The targets (2-core machine, GPT-2 vocabulary): >= 1 M tokens/s with 2 workers, and peak RSS of the larger
input within 10 % of the smaller one (memory does not grow with input size).
"""
import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zstandard

ROOT = Path(__file__).resolve().parent.parent


def bundled_records():
    records = []
    for name in ("sotu", "brown"):
        with open(ROOT / f"assets/corpus/{name}.jsonl.zst", "rb") as f:
            reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
            records += [line.rstrip("\n") for line in reader if line.strip()]
    return records


def build_corpus(path: Path, min_bytes: int, records) -> int:
    """Repeat the bundled records (as JSON lines) until at least min_bytes of JSON text; returns the size."""
    written = 0
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as out:
        while written < min_bytes:
            for line in records:
                data = (line + "\n").encode()
                out.write(data)
                written += len(data)
                if written >= min_bytes:
                    break
    return written


def tokenizer_ceiling(tokenizer_dir, records, n_bytes=5_000_000):
    """Tokens per CPU-second of the bare Rust tokenizer on one core: the most one worker can do."""
    from tokenizers import Tokenizer
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        return None
    tok = Tokenizer.from_file(str(path))
    texts, size = [], 0
    for line in records:
        texts.append(json.loads(line)["text"])
        size += len(texts[-1])
        if size >= n_bytes:
            break
    t0, tokens = time.process_time(), 0
    for i in range(0, len(texts), 64):
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + 64]))
    return round(tokens / (time.process_time() - t0))


def measure(cmd, env):
    """Run cmd; sample the process tree's memory and CPU until it exits."""
    proc = psutil.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_tree = peak_main = 0
    cpu_by_pid = {}
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            rss = []
            for p in tree:
                try:
                    rss.append(p.memory_info().rss)
                    t = p.cpu_times()
                    cpu_by_pid[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            peak_tree = max(peak_tree, sum(rss))
            peak_main = max(peak_main, rss[0] if rss else 0)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"tokenize failed ({proc.returncode}):\n{output}")
    return peak_tree, peak_main, cpu_by_pid.get(proc.pid, 0.0), sum(cpu_by_pid.values()), output


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="JSON file for the results")
    p.add_argument("--tokenizer", default=str(ROOT / "assets/tokenizers/gpt2"))
    p.add_argument("--size-mb", type=float, default=50.0, help="text size of the 1x corpus (MB)")
    p.add_argument("--scale", type=int, default=5, help="size of the large corpus relative to the 1x one")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--workdir", default=None, help="where to build the corpora (default: a temp folder)")
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_prep_"))
    workdir.mkdir(parents=True, exist_ok=True)
    records = bundled_records()
    sizes = {}
    for scale in (1, args.scale):
        path = workdir / f"corpus_{scale}x.jsonl.zst"
        sizes[scale] = build_corpus(path, int(args.size_mb * scale * 1e6), records)
        print(f"built {path.name}: {sizes[scale] / 1e6:.1f} MB of JSON lines "
              f"({path.stat().st_size / 1e6:.1f} MB compressed)", flush=True)

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ceiling = tokenizer_ceiling(args.tokenizer, records)
    print(f"bare tokenizer on one core: {ceiling / 1e6:.2f} M tokens per CPU-second" if ceiling else "", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    runs = []
    for scale in (1, args.scale):
        for workers in [int(w) for w in args.workers.split(",")]:
            out_prefix = workdir / f"out_{scale}x_{workers}w"
            cmd = [sys.executable, "-m", "data_prep.tokenize", "--input", str(workdir / f"corpus_{scale}x.jsonl.zst"),
                   "--tokenizer", args.tokenizer, "--output-prefix", str(out_prefix), "--workers", str(workers),
                   "--log-interval", "30"]
            load_before = os.getloadavg()[0]
            t0 = time.time()
            peak_tree, peak_main, main_cpu_s, cpu_s, _ = measure(cmd, env)
            wall = time.time() - t0
            stats = json.loads(Path(str(out_prefix) + ".stats.json").read_text())
            run = {"scale": scale, "workers": workers, "input_mb": round(sizes[scale] / 1e6, 1),
                   "documents": stats["documents"], "tokens": stats["tokens"],
                   "tokens_per_s": round(stats["tokens_per_s"]), "tokenize_s": stats["tokenize_seconds"],
                   "wall_s": round(wall, 2), "tokens_per_s_wall": round(stats["tokens"] / wall),
                   "tokens_per_cpu_s": round(stats["tokens"] / cpu_s) if cpu_s else None,
                   "cpu_s_main": round(main_cpu_s, 1), "cpu_s_total": round(cpu_s, 1),
                   "peak_rss_mb": round(peak_tree / 2**20, 1), "peak_rss_main_mb": round(peak_main / 2**20, 1),
                   "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
            runs.append(run)
            print(f"  {scale}x {workers} worker(s): {run['tokens_per_s'] / 1e6:.2f} M tokens/s, "
                  f"peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
            for ext in (".bin", ".idx"):
                os.remove(str(out_prefix) + ext)

    def pick(scale, workers):
        return next((r for r in runs if r["scale"] == scale and r["workers"] == workers), None)

    two = pick(1, 2)
    growth = {w: round(pick(args.scale, w)["peak_rss_mb"] / pick(1, w)["peak_rss_mb"] - 1, 4)
              for w in sorted({r["workers"] for r in runs})}
    result = {
        "machine": {"cpus": psutil.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "tokenizer": args.tokenizer, "bare_tokenizer_tokens_per_cpu_s": ceiling, "runs": runs,
        "peak_rss_growth_5x_vs_1x": growth,
        "targets": {"tokens_per_s_2_workers_ge_1M": bool(two and two["tokens_per_s"] >= 1e6),
                    "peak_rss_growth_within_10pct": all(abs(g) <= 0.10 for g in growth.values())},
    }
    header = f"{'input':>8} {'workers':>7} {'tokens':>12} {'M tok/s':>8} {'M tok/s wall':>12} " \
             f"{'M tok/CPU-s':>11} {'peak RSS MB':>11} {'main RSS MB':>11} {'load':>5}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in runs:
        print(f"{r['input_mb']:>6.0f}MB {r['workers']:>7} {r['tokens']:>12,} {r['tokens_per_s'] / 1e6:>8.2f} "
              f"{r['tokens_per_s_wall'] / 1e6:>12.2f} {(r['tokens_per_cpu_s'] or 0) / 1e6:>11.2f} "
              f"{r['peak_rss_mb']:>11.0f} {r['peak_rss_main_mb']:>11.0f} {r['load_avg_1m_before']:>5.1f}")
    print(f"peak RSS growth {args.scale}x vs 1x: " + ", ".join(f"{w} worker(s) {g:+.1%}" for w, g in growth.items()))
    print("targets: " + ", ".join(f"{k}={v}" for k, v in result["targets"].items()))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
