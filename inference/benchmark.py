"""Decoding speed of the modes side by side, judged against predictions from measured step costs (DESIGN.md §2).

    python -m inference.benchmark --preset 125m --random-init --modes standard,recycle,verify --output b.json
    python -m inference.benchmark --model DIR --prompt-corpus assets/corpus/brown.jsonl.zst \\
        --draft-len 1,2,3,4,auto --draft-vocab DIR/draft_vocab.safetensors --compare-draft-vocab --output b.json
    python -m inference.benchmark --model DIR --prompt-corpus FILE --draft-width 0,1,4 --lookup 0,8 --output b.json

All modes run in one process on the same prompts, with interleaved repeats (the order rotates each repeat)
after a warmup, so that machine noise hits every mode alike; repeat r decodes the r-th batch of prompts in
every mode. EOS is ignored: every row emits exactly --new-tokens tokens. `verify` runs once per
--draft-len value (entries `verify`, or `verify_k2`, `verify_auto`, ... for several; `_dv` with the draft
vocabulary). Between repeats it samples the step costs at the mid-generation cache length
(inference/step_costs.py) and reports, per entry:

    predicted  tau_cycle / (c(k+1)/c(1) + k f + (k-1) f_refresh)  for verify with k drafts (tau_cycle: tokens
               per cycle as measured, prefill excluded; inference/draft_policy.py cycle_cost);
               2 / (c(2)/c(1) + f_2) for recycle (the structural bound)
    speedup    measured tokens/s over standard's (median of repeats; speedup_best: best of repeats;
               speedup_total: all repeats' tokens over all their seconds, which weighs every prompt by its
               time: where tau differs much from prompt to prompt, as with --lookup, the median picks one prompt)

Writes FILE.json with everything and FILE.png (tokens/s per entry, predicted speedups as markers).

Under torchrun / deepspeed / srun with --tp N every rank runs the same loop on its shard and rank 0 writes
the report, with `tp`, `world_size` and each rank's peak RSS; `--baseline` (a report at another --tp of
the same model) adds the TP scaling line (inference/tp_report.py). `--memory-plan` only sizes a preset
per rank for TP 1/2/4/8 and loads nothing.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

from inference.cli import (OneLineArgumentParser, UsageError, add_decoding_args, add_model_args, check_draft_width,
                           check_model_args, model_from_args, parse_draft_len, parse_draft_widths, parse_lookups,
                           run_main, sampling_from_args)
from inference.decoding import MODES
from inference.draft_vocab import load_draft_vocab


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m inference.benchmark", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    p.add_argument("--output", required=True, metavar="FILE.json", help="results; the plot goes next to it (.png)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together per run")
    p.add_argument("--prompt", help="text (tiled to --prompt-len tokens) instead of random token ids")
    p.add_argument("--prompt-corpus", metavar="FILE", help=".jsonl or .jsonl.zst with a 'text' field: prompts are "
                   "the first --prompt-len tokens of its documents (one per row and repeat)")
    p.add_argument("--compare-draft-vocab", action="store_true",
                   help="with --draft-vocab: run every verify entry with and without it")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--cost-rounds", type=int, default=60, help="samples of each step cost between repeats (fewer "
                   "for 7B on a CPU)")
    p.add_argument("--baseline", metavar="FILE.json", help="a report of the same model at another --tp: adds the "
                   "TP scaling line")
    p.add_argument("--memory-plan", action="store_true", help="print and write the memory per rank for --tp "
                   "1/2/4/8 and exit (loads nothing)")
    return p


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--modes {text!r}: unknown mode(s) {bad}; valid: {','.join(MODES)}")
    return list(dict.fromkeys(modes))


def entries(modes, draft_lens, with_vocab: list[bool], widths=(1,), lookups=(0,)) -> list[dict]:
    """The runs to compare: name, mode, draft_len (int or 'auto'), draft_width, lookup, whether the draft
    vocabulary is used. Token trees (inference/tree_verify.py: widths other than 1, lookups > 0) go with k = 1
    only: `verify_k1_w4`, `verify_w4`, `verify_l8`, `verify_w0_l8` (lookup alone) ..."""
    out = []
    for mode in modes:
        if mode != "verify":
            # recycle drafts over the draft vocabulary when one is given (and not being compared)
            out.append({"name": mode, "mode": mode, "draft_len": 1, "draft_width": 1, "lookup": 0,
                        "draft_vocab": mode == "recycle" and with_vocab == [True]})
            continue
        for k in draft_lens:
            for dv in with_vocab:
                name = "verify" + ("" if len(draft_lens) == 1 else f"_k{k}" if k != "auto" else "_auto")
                trees = [(w, n) for w in widths for n in lookups if w or n] if k == 1 else [(1, 0)]
                for w, n in trees:
                    tree = (f"_w{w}" if w != 1 else "") + (f"_l{n}" if n else "")
                    out.append({"name": name + tree + ("_dv" if dv and len(with_vocab) > 1 else ""),
                                "mode": "verify", "draft_len": k, "draft_width": w, "lookup": n, "draft_vocab": dv})
    return out


# ---------------------------------------------------------------------------------------------- prompts
def corpus_texts(path: Path, count: int) -> list[str]:
    import io

    import zstandard

    texts = []
    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.suffix == ".zst" else raw
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            if line.strip():
                text = json.loads(line).get("text", "")
                if len(text) > 200:
                    texts.append(text)
            if len(texts) >= count:
                break
    return texts


def make_prompts(args, model, tokenizer, count: int) -> list[list[int]]:
    import torch

    if args.prompt_corpus:
        texts = corpus_texts(Path(args.prompt_corpus), count)
        prompts = [tokenizer.encode(t)[:args.prompt_len] for t in texts]
        prompts = [p for p in prompts if len(p) == args.prompt_len]
        if not prompts:
            raise UsageError(f"--prompt-corpus {args.prompt_corpus}: no document has {args.prompt_len} tokens")
        return [prompts[i % len(prompts)] for i in range(count)]
    if args.prompt:
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise UsageError("--prompt is empty after tokenization")
        return [(ids * (args.prompt_len // len(ids) + 1))[:args.prompt_len]] * count
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, model.cfg.vocab_size, (count, args.prompt_len), generator=gen).tolist()


# ------------------------------------------------------------------------------------------------ runs
def run_entries(model, batches, todo, new_tokens, sampling, draft_vocab, costs, cost_rounds: int = 60) -> dict:
    from inference.decoding import generate_batch
    from inference.draft_policy import AutoDraftLen, draft_costs

    from inference.step_costs import same_on_every_rank

    base_costs = same_on_every_rank(costs.summary())      # what `auto` decides from: alike on all TP ranks

    def run(entry, prompts, n):
        k = entry["draft_len"]
        if k == "auto":         # from the step costs measured before the runs
            k = AutoDraftLen(base_costs["cost_ratio"], *draft_costs(base_costs, entry["draft_vocab"]))
        return generate_batch(model, prompts, entry["mode"], n, draft_len=k, sampling=sampling,
                              draft_vocab=draft_vocab if entry["draft_vocab"] else None,
                              draft_width=entry["draft_width"], lookup=entry["lookup"])

    for entry in todo:                       # warmup: allocator, kernels, first-call overheads
        run(entry, batches[0], min(new_tokens, 8))
    runs = {e["name"]: [] for e in todo}
    for r, prompts in enumerate(batches):
        for entry in todo[r % len(todo):] + todo[:r % len(todo)]:
            runs[entry["name"]].append(run(entry, prompts, new_tokens))
        costs.sample(-(-cost_rounds // len(batches)))
    results = {}
    for entry in todo:
        gens = runs[entry["name"]]
        tps = [g.tokens_per_s for g in gens]
        stats = [s for g in gens for s in g.stats]
        tokens = sum(s.new_tokens for s in stats)
        forwards = sum(s.full_forwards for s in stats)
        proposed, accepted = sum(s.proposed for s in stats), sum(s.accepted for s in stats)
        used: dict = {}
        for g in gens:
            for k, n in (g.stats[0].draft_lens_used or {g.stats[0].draft_len: 1}).items():
                used[k] = used.get(k, 0) + n
        results[entry["name"]] = {
            "mode": entry["mode"], "draft_len": max(used, key=used.get), "draft_len_auto": entry["draft_len"] == "auto",
            "draft_lens_used": used, "draft_width": entry["draft_width"], "lookup": entry["lookup"],
            "draft_vocab": bool(entry["draft_vocab"]),
            "temperature": sampling.temperature, "batch_size": len(batches[0]),
            "tokens_per_s": statistics.median(tps), "tokens_per_s_best": max(tps), "tokens_per_s_runs": tps,
            "tokens_per_s_total": sum(g.new_tokens for g in gens) / sum(g.seconds for g in gens),
            "tau": tokens / forwards, "tau_cycle": (tokens - len(stats)) / max(forwards - len(stats), 1),
            "acceptance_rate": accepted / proposed if proposed else None,
            "full_forwards": forwards / len(gens), "module_forwards": sum(s.module_forwards for s in stats) / len(gens),
            "new_tokens": tokens / len(gens), "prefill_s": statistics.median(s.prefill_seconds for s in stats),
            "tokens": [[row.tokens for row in g.rows] for g in gens]}
    return results


def compare(results: dict, costs: dict, greedy: bool):
    """Speedups over standard, predictions from the step costs, and the lossless check (greedy only)."""
    from inference.draft_policy import cycle_cost, draft_costs

    std = results.get("standard")
    for res in results.values():
        if res["mode"] == "verify" and not res["lookup"]:    # a lookup's tree size varies per cycle: no prediction
            cost = cycle_cost(res["draft_len"], costs["cost_ratio"], *draft_costs(costs, res["draft_vocab"]),
                              width=res["draft_width"])
            res["predicted_speedup"] = res["tau_cycle"] / cost
        elif res["mode"] == "recycle" and "recycle_bound" in costs:
            res["predicted_speedup"] = costs["recycle_bound_dv" if res["draft_vocab"] else "recycle_bound"]
        if std is None:
            continue
        res["speedup"] = res["tokens_per_s"] / std["tokens_per_s"]
        # Load from other processes only ever slows a run down: best-of-runs is a second, less noisy view.
        res["speedup_best"] = res["tokens_per_s_best"] / std["tokens_per_s_best"]
        res["speedup_total"] = res["tokens_per_s_total"] / std["tokens_per_s_total"]
        if res["mode"] == "verify":
            # Lossless means identical tokens (greedy); sampled texts differ run to run by design.
            res["identical_to_standard"] = res["tokens"] == std["tokens"] if greedy else None
    for res in results.values():          # the first run's rows stay: runs at another --tp must match them
        res["tokens"] = res["tokens"][0]


# ----------------------------------------------------------------------------------------------- output
def print_table(report: dict):
    costs, results = report["step_costs"], report["modes"]
    print(f"{report['model']}  ({report['parameters']['total'] / 1e6:.1f}M params, {report['device']}, "
          f"{report['dtype']}, {report['weight_layout']}-major weights, {report['threads']} threads)  prompt "
          f"{report['prompt_len']}, {report['new_tokens']} new tokens, tp {report['tp']}, batch {report['batch_size']}, temperature {report['temperature']}, {report['repeats']} repeats")
    print(f"{'entry':<16}{'k':>5}{'tokens/s':>10}{'speedup':>9}{'best':>7}{'total':>7}{'predicted':>10}{'tau':>7}"
          f"{'accept':>8}{'identical':>10}")
    for name, r in results.items():
        acc = "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        best = f"{r['speedup_best']:.2f}x" if "speedup" in r else "-"
        total = f"{r['speedup_total']:.2f}x" if "speedup" in r else "-"
        pred = f"{r['predicted_speedup']:.2f}x" if "predicted_speedup" in r else "-"
        k = (f"a{r['draft_len']}" if r["draft_len_auto"] else str(r["draft_len"])) if r["mode"] == "verify" else "-"
        same = {True: "yes", False: "NO", None: "-"}[r.get("identical_to_standard")]
        print(f"{name:<16}{k:>5}{r['tokens_per_s']:>10.1f}{speed:>9}{best:>7}{total:>7}{pred:>10}{r['tau']:>7.2f}{acc:>8}"
              f"{same:>10}")
    ratios = ", ".join(f"c({m})/c(1) {v:.2f}" for m, v in costs["cost_ratio"].items() if m > 1)
    line = f"step costs at {costs['context_len']} cached positions: c(1) {1e3 * costs['full_1_s']:.2f} ms, {ratios}"
    if "f" in costs:
        line += f"; f {costs['f']:.2f}" + (f" (draft vocabulary {costs['f_dv']:.2f})" if "f_dv" in costs else "")
        line += (f", f_2 {costs['f_2']:.2f}, f_refresh {costs['f_refresh']:.2f}; "
                 f"recycle bound {costs['recycle_bound']:.2f}x")
    print(line)


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["modes"]
    names = list(results)
    med = [results[n]["tokens_per_s"] for n in names]
    lo = [med[i] - min(results[n]["tokens_per_s_runs"]) for i, n in enumerate(names)]
    hi = [max(results[n]["tokens_per_s_runs"]) - med[i] for i, n in enumerate(names)]
    colors = {"standard": "#888", "recycle": "#3a7", "verify": "#37a"}
    scaling = len(report.get("tp_scaling") or {}) > 1
    fig, axes = plt.subplots(1, 2 if scaling else 1, figsize=(max(6, 0.9 * len(names)) + (5 if scaling else 0), 4),
                             squeeze=False)
    ax = axes[0][0]
    if scaling:
        from inference.tp_report import plot_scaling
        plot_scaling(axes[0][1], report)
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color=[colors[results[n]["mode"]] for n in names])
    std = results.get("standard", {}).get("tokens_per_s")
    for i, n in enumerate(names):
        r = results[n]
        note = (f"{r['speedup']:.2f}x\n" if "speedup" in r else "") + f"tau {r['tau']:.2f}"
        ax.text(i, med[i] / 2, note, ha="center", va="center", color="white", fontsize=8)
        if std and "predicted_speedup" in r:
            ax.plot(i, r["predicted_speedup"] * std, "k_", markersize=18,
                    label="predicted from step costs" if i == names.index(next(x for x in names
                                                                              if "predicted_speedup" in results[x])) else None)
    if std:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title(f"{report['model']}, {report['device']} {report['dtype']}, tp {report.get('tp', 1)}, batch "
                 f"{report['batch_size']}, T={report['temperature']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    modes = parse_modes(args.modes)
    draft_lens = list(dict.fromkeys(parse_draft_len(t.strip(), args.max_draft_len) for t in args.draft_len.split(",")))
    sampling = sampling_from_args(args)
    args.draft_width = widths = parse_draft_widths(args.draft_width)       # parsed once: lists from here on
    args.lookup = lookups = parse_lookups(args.lookup)
    if widths != [1] or lookups != [0]:
        if 1 not in draft_lens:
            raise UsageError(f"--draft-width {','.join(map(str, widths))} --lookup {','.join(map(str, lookups))}: "
                             "token trees go with --draft-len 1; add 1 to --draft-len")
        if 0 in widths and lookups == [0]:
            raise UsageError("--draft-width 0 (the module idle) needs --lookup L > 0")
        for w in widths:
            check_draft_width(w, "verify", 1, args.batch_size, max(lookups))
    for name in ("prompt_len", "new_tokens", "repeats", "batch_size", "cost_rounds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.compare_draft_vocab and not args.draft_vocab:
        raise UsageError("--compare-draft-vocab needs --draft-vocab FILE")
    if args.prompt_corpus and not Path(args.prompt_corpus).is_file():
        raise UsageError(f"--prompt-corpus {args.prompt_corpus}: no such file")
    out = Path(args.output)
    if out.suffix != ".json" or not out.parent.is_dir():
        raise UsageError(f"--output {out}: give a .json file in an existing folder")
    check_model_args(args)
    from inference import tp_loading, tp_report

    baseline = tp_report.read_baseline(args.baseline)
    if args.memory_plan:
        return write_memory_plan(args, out)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    max_k = max([k for k in draft_lens if k != "auto"] + [args.max_draft_len if "auto" in draft_lens else 1]
                + [w + max(lookups) for w in widths])        # step costs up to c(1 + max(k, W + L))
    model, tokenizer, device, dtype, description = model_from_args(args, args.prompt_len + args.new_tokens + max_k + 1)
    try:
        return benchmark(args, modes, draft_lens, sampling, max_k, out, baseline, model, tokenizer, device, dtype,
                         description)
    finally:
        tp_loading.finish()


def write_memory_plan(args, out: Path) -> int:
    from inference.loading import parse_dtype
    from inference.tp_report import memory_plan, print_plan

    dtype = args.dtype or "bf16"
    plan = memory_plan(args.model_config, parse_dtype(dtype), args.prompt_len + args.new_tokens + 2)
    name = args.preset or args.model
    print_plan(name, dtype, plan)
    out.write_text(json.dumps({"model": name, "dtype": dtype, "memory_plan": plan}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def benchmark(args, modes, draft_lens, sampling, max_k, out, baseline, model, tokenizer, device, dtype,
              description) -> int:
    """Every rank runs this (same prompts, same loop on its TP shard); rank 0 prints and writes."""
    import torch

    from inference import tp_loading, tp_report, weight_layout
    from inference.step_costs import StepCosts

    load_peak = tp_loading.peak_rss_bytes()
    if model.recycle is None and set(modes) - {"standard"}:
        raise UsageError("this model has no recyclable module (recycle_layers = 0); use --modes standard")
    if args.prompt_len + args.new_tokens + max_k > model.cfg.max_seq_len:
        raise UsageError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} + draft length {max_k} "
                         f"exceeds the model's context of {model.cfg.max_seq_len} tokens; lower one of them")
    if (args.prompt or args.prompt_corpus) and tokenizer is None:
        raise UsageError("--prompt/--prompt-corpus need a tokenizer; pass --tokenizer DIR")
    draft_vocab = load_draft_vocab(args, model)
    if draft_vocab is not None:
        draft_vocab.to(device)
    prompts = make_prompts(args, model, tokenizer, args.batch_size * args.repeats)
    batches = [prompts[r * args.batch_size:(r + 1) * args.batch_size] for r in range(args.repeats)]
    with_vocab = [False, True] if args.compare_draft_vocab else [draft_vocab is not None]
    todo = entries(modes, draft_lens, with_vocab, args.draft_width, args.lookup)
    context = args.prompt_len + args.new_tokens // 2                          # the mid-generation length
    costs = StepCosts(model, prompts[0], context, max_k + 1, batch=args.batch_size, draft_vocab=draft_vocab)
    costs.sample(min(10, args.cost_rounds))  # before the runs: what --draft-len auto decides from
    results = run_entries(model, batches, todo, args.new_tokens, sampling, draft_vocab, costs, args.cost_rounds)
    summary = costs.summary()
    compare(results, summary, sampling.greedy)
    report = {"model": description, "parameters": model.cfg.num_parameters(), "config": model.cfg.to_dict(),
              "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "dtype": str(dtype).replace("torch.", ""), "weight_layout": weight_layout.layout_of(model),
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "host": platform.node(), "prompt_len": args.prompt_len,
              "prompt_source": args.prompt_corpus or ("text" if args.prompt else "random ids"),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "batch_size": args.batch_size,
              "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "seed": args.seed, "draft_vocab": args.draft_vocab, "draft_vocab_size": len(draft_vocab or []),
              "modes": results, "step_costs": summary, "tp": args.tp,
              "world_size": tp_loading.launcher_world_size(), "per_rank": tp_report.rank_memory(load_peak)}
    if not tp_loading.is_rank0():
        return 0
    report["tp_scaling"] = tp_report.scaling(report, baseline)
    print_table(report)
    tp_report.print_tp_lines(report)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
