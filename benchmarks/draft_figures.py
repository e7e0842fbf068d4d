"""The draft-length figures of docs/inference.md (issue 9): tau and tokens/s for k = 1..K, with and without the
draft vocabulary, greedy and sampled, at batch 1 and B, with standard and recycle beside them.

    python benchmarks/draft_figures.py --model RUN_DIR --draft-vocab RUN_DIR/draft_vocab.safetensors \\
        --prompt-corpus assets/corpus/brown.jsonl.zst --output runs/figs/draft_figures.json

Runs `python -m inference.benchmark` once per (temperature, batch size) with every draft length and both
vocabularies (one process each, so each comparison is side by side under the same load), keeps each run's
JSON + PNG next to the output, and writes the combined FILE.json, FILE.png and a markdown table (FILE.md).
Extra arguments after `--` go to every benchmark run (e.g. `-- --new-tokens 48`). `--draft-width 1,4` adds the
module's top-4 tokens verified side by side at k = 1 to the batch-1 runs, `--lookup 0,8` copies of up to 8
tokens from earlier in the text (inference/tree_verify.py, inference/lookup.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def config_output(args, temperature: float, batch: int) -> Path:
    return Path(args.output).with_name(f"{Path(args.output).stem}_T{temperature}_B{batch}.json")


def config_command(args, temperature: float, batch: int, extra: list[str]) -> list[str]:
    out = config_output(args, temperature, batch)
    cmd = [sys.executable, "-m", "inference.benchmark", "--model", args.model, "--prompt-corpus", args.prompt_corpus,
           "--modes", "standard,recycle,verify", "--draft-len", ",".join(str(k) for k in range(1, args.max_k + 1)),
           "--batch-size", str(batch), "--temperature", str(temperature), "--threads", "1", "--output", str(out)]
    if args.draft_vocab:
        cmd += ["--draft-vocab", args.draft_vocab, "--compare-draft-vocab"]
    if batch == 1 and args.draft_width != "1":       # token trees decode one prompt at a time
        cmd += ["--draft-width", args.draft_width]
    if batch == 1 and args.lookup != "0":
        cmd += ["--lookup", args.lookup]
    return cmd + extra


def run_configs(args, configs: list[tuple[float, int]], extra: list[str]) -> list[dict]:
    """One benchmark process per configuration; with --parallel all at once (on a CPU shared with other jobs
    this gets through the grid sooner, and every comparison stays inside one process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmds = [config_command(args, t, b, extra) for t, b in configs]
    procs = []
    for (t, b), cmd in zip(configs, cmds):
        print("$ python " + " ".join(cmd[1:]), flush=True)
        if args.parallel:
            log = open(config_output(args, t, b).with_suffix(".log"), "w")
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        else:
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    for proc, cmd in zip(procs, cmds):
        if proc.wait() != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see its .log")
    reports = []
    for (t, b), cmd in zip(configs, cmds):
        report = json.loads(config_output(args, t, b).read_text())
        report["command"] = "python " + " ".join(cmd[1:])
        reports.append(report)
    return reports


def table(reports: list[dict]) -> str:
    lines = ["| T | batch | entry | k | W | L | draft vocab | tokens/s | speedup (best) | total | predicted | tau "
             "| acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        for name, r in rep["modes"].items():
            acc = "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f} %"
            pred = f"{r['predicted_speedup']:.2f}x" if "predicted_speedup" in r else "-"
            k, w, n = ((r["draft_len"], r.get("draft_width", 1), r.get("lookup", 0)) if r["mode"] == "verify"
                       else ("-", "-", "-"))
            lines.append(f"| {rep['temperature']} | {rep['batch_size']} | {name} | {k} | {w} | {n} | "
                         f"{'yes' if r['draft_vocab'] else 'no'} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x "
                         f"({r['speedup_best']:.2f}x) | {r['speedup_total']:.2f}x | {pred} | {r['tau']:.2f} | {acc} |")
    return "\n".join(lines)


def cost_table(reports: list[dict]) -> str:
    """The step costs each configuration measured (what its `predicted` column and `--draft-len auto` use)."""
    ms = sorted({int(m) for rep in reports for m in rep["step_costs"]["cost_ratio"] if int(m) > 1})
    lines = ["| T | batch | c(1) | " + " | ".join(f"c({m})/c(1)" for m in ms) + " | f (draft vocab) | recycle bound |",
             "|---|---|---|" + "---|" * len(ms) + "---|---|"]
    for rep in reports:
        c = rep["step_costs"]
        ratios = {int(m): v for m, v in c["cost_ratio"].items()}
        f = f"{c['f']:.2f}" + (f" ({c['f_dv']:.2f})" if "f_dv" in c else "") if "f" in c else "-"
        bound = f"{c['recycle_bound']:.2f}x" if "recycle_bound" in c else "-"
        lines.append(f"| {rep['temperature']} | {rep['batch_size']} | {1e3 * c['full_1_s']:.1f} ms | "
                     + " | ".join(f"{ratios[m]:.2f}" if m in ratios else "-" for m in ms) + f" | {f} | {bound} |")
    return "\n".join(lines)


def plot(reports: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(reports), figsize=(4.2 * len(reports), 7), squeeze=False)
    for col, rep in enumerate(reports):
        modes = rep["modes"]
        top, bottom = axes[0][col], axes[1][col]
        for dv, style in ((False, "o-"), (True, "s--")):
            verify = [r for r in modes.values() if r["mode"] == "verify" and r["draft_vocab"] == dv]
            pts = sorted((r["draft_len"], r) for r in verify if r.get("draft_width", 1) == 1 and not r.get("lookup"))
            label = "verify" + (" + draft vocab" if dv else "")
            if pts:
                top.plot([k for k, _ in pts], [r["tokens_per_s"] for _, r in pts], style, label=label)
                bottom.plot([k for k, _ in pts], [r["tau"] for _, r in pts], style, label=label)
            trees = [r for r in verify if r.get("draft_width", 1) != 1 or r.get("lookup")]
            for r in trees:                                                 # k = 1 token trees: one point each
                wide = f"{label}, W={r['draft_width']}" + (f", L={r['lookup']}" if r.get("lookup") else "")
                top.plot([1], [r["tokens_per_s"]], "^" if dv else "v", label=wide)
                bottom.plot([1], [r["tau"]], "^" if dv else "v", label=wide)
        for name, color in (("standard", "#888"), ("recycle", "#3a7")):
            if name in modes:
                top.axhline(modes[name]["tokens_per_s"], color=color, ls=":", label=name)
                bottom.axhline(modes[name]["tau"], color=color, ls=":", label=name)
        top.set_title(f"T={rep['temperature']}, batch {rep['batch_size']}", fontsize=10)
        top.set_ylabel("tokens/s (median)")
        bottom.set_ylabel("tau (tokens per full forward)")
        bottom.set_xlabel("draft length k")
        top.legend(fontsize=7)
    fig.suptitle(f"{reports[0]['model']}: {reports[0]['device']} {reports[0]['dtype']} "
                 f"({reports[0].get('weight_layout', 'row')}-major weights), 1 thread, "
                 f"prompts from {Path(reports[0]['prompt_source']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python benchmarks/draft_figures.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--draft-vocab")
    p.add_argument("--prompt-corpus", default="assets/corpus/brown.jsonl.zst")
    p.add_argument("--max-k", type=int, default=4)
    p.add_argument("--temperatures", default="0,0.7")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--draft-width", default="1", metavar="W[,W...]",
                   help="also verify the module's top W tokens at k = 1 (batch-1 configurations only)")
    p.add_argument("--lookup", default="0", metavar="L[,L...]",
                   help="also verify copies of up to L tokens from earlier in the text at k = 1 (batch 1 only)")
    p.add_argument("--parallel", action="store_true", help="run the configurations at the same time")
    p.add_argument("--output", required=True, metavar="FILE.json")
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.suffix != ".json" or not out.parent.is_dir():
        p.error(f"--output {out}: give a .json file in an existing folder")
    configs = [(float(t), int(b)) for b in args.batch_sizes.split(",") for t in args.temperatures.split(",")]
    reports = run_configs(args, configs, extra)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"runs": reports}, indent=2) + "\n")
    tmp.replace(out)
    md = table(reports) + "\n\nStep costs:\n\n" + cost_table(reports)
    out.with_suffix(".md").write_text(md + "\n")
    plot(reports, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
