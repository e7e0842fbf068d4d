"""Row-major vs column-major Linear weights (`--weight-layout`, inference/weight_layout.py) side by side.

Loads the model once, keeps a second copy with the other layout, and decodes the same prompts with both in
one process: every repeat runs every entry (standard, recycle, verify at each --draft-len, with and without
the draft vocabulary) on both copies, the order rotating per repeat, and between repeats samples both copies'
step costs (inference/step_costs.py). The figures to read are ratios (column over row), since the machine is
shared and noisy; greedy output of the two layouts must be identical (checked per entry).

    python benchmarks/weight_layout.py --model runs/smollm2-recycle --prompt-corpus assets/corpus/brown.jsonl.zst \\
        --draft-len 1,2,3 --draft-vocab runs/smollm2-recycle/draft_vocab.safetensors --threads 1 \\
        --prompt-len 32 --new-tokens 48 --repeats 4 --cost-rounds 12 --output runs/bench/weight_layout_fp32.json

Writes FILE.json (per layout and entry: tokens/s runs, median, best, tau, prefill; step costs; column/row
ratios) and FILE.md (the tables of docs/inference.md).
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.benchmark import entries, make_prompts, parse_modes  # noqa: E402
from inference.cli import (OneLineArgumentParser, UsageError, add_decoding_args, add_model_args,  # noqa: E402
                           check_model_args, model_from_args, parse_draft_len, resolve_draft_vocab, run_main)

LAYOUTS = ("row", "column")


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python benchmarks/weight_layout.py", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--modes", default="standard,verify", help="comma-separated, from: standard, recycle, verify")
    p.add_argument("--output", required=True, metavar="FILE.json")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt", help="text (tiled to --prompt-len tokens) instead of random token ids")
    p.add_argument("--prompt-corpus", metavar="FILE", help=".jsonl(.zst) with a 'text' field: prompts from it")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cost-rounds", type=int, default=12, help="samples of each step cost per layout")
    return p


def decode_both(models, vocabs, batches, todo, new_tokens, cost_rounds: int, costs) -> dict:
    from inference.decoding import generate_batch

    def run(layout, entry, prompts, n):
        return generate_batch(models[layout], prompts, entry["mode"], n, draft_len=entry["draft_len"],
                              draft_vocab=vocabs[layout] if entry["draft_vocab"] else None)

    for layout in LAYOUTS:                   # warmup: allocator, kernels, the draft vocabulary's row copy
        for entry in todo:
            run(layout, entry, batches[0], min(new_tokens, 8))
    pairs = [(layout, e) for e in todo for layout in LAYOUTS]
    gens = {(layout, e["name"]): [] for layout, e in pairs}
    for r, prompts in enumerate(batches):
        shift = r % len(pairs)
        for layout, entry in pairs[shift:] + pairs[:shift]:
            gens[(layout, entry["name"])].append(run(layout, entry, prompts, new_tokens))
        for layout in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
            costs[layout].sample(-(-cost_rounds // len(batches)))
    return gens


def summarize(gens, todo, costs) -> dict:
    out = {layout: {"modes": {}, "step_costs": costs[layout].summary()} for layout in LAYOUTS}
    for layout in LAYOUTS:
        for entry in todo:
            runs = gens[(layout, entry["name"])]
            stats = [s for g in runs for s in g.stats]
            tps = [g.tokens_per_s for g in runs]
            out[layout]["modes"][entry["name"]] = {
                "mode": entry["mode"], "draft_len": entry["draft_len"], "draft_vocab": entry["draft_vocab"],
                "tokens_per_s": statistics.median(tps), "tokens_per_s_best": max(tps), "tokens_per_s_runs": tps,
                "tau": sum(s.new_tokens for s in stats) / sum(s.full_forwards for s in stats),
                "prefill_s": statistics.median(s.prefill_seconds for s in stats)}
    ratios = {}
    for entry in todo:
        row, col = out["row"]["modes"][entry["name"]], out["column"]["modes"][entry["name"]]
        same = [[r.tokens for r in g.rows] for g in gens[("row", entry["name"])]] == \
               [[r.tokens for r in g.rows] for g in gens[("column", entry["name"])]]
        ratios[entry["name"]] = {"column_over_row": col["tokens_per_s"] / row["tokens_per_s"],
                                 "column_over_row_best": col["tokens_per_s_best"] / row["tokens_per_s_best"],
                                 "prefill_column_over_row": col["prefill_s"] / row["prefill_s"],
                                 "identical_tokens": same}
    for layout in LAYOUTS:                   # each layout's own speedup over its own standard
        std = out[layout]["modes"].get("standard")
        for res in out[layout]["modes"].values():
            if std:
                res["speedup"] = res["tokens_per_s"] / std["tokens_per_s"]
                res["speedup_best"] = res["tokens_per_s_best"] / std["tokens_per_s_best"]
    cost_ratios = {}
    for key in ("full_1_s", "module_1_s", "module_1_dv_s"):
        if key in out["row"]["step_costs"]:
            cost_ratios[key] = out["column"]["step_costs"][key] / out["row"]["step_costs"][key]
    return {"layouts": out, "column_over_row": ratios, "step_cost_column_over_row": cost_ratios}


def print_table(report: dict):
    layouts, ratios = report["layouts"], report["column_over_row"]
    print(f"{report['model']}  {report['dtype']}, {report['threads']} thread(s), prompt {report['prompt_len']}, "
          f"{report['new_tokens']} new tokens, batch {report['batch_size']}, {report['repeats']} repeats")
    print(f"{'entry':<14}{'row tok/s':>10}{'col tok/s':>10}{'col/row':>9}{'(best)':>8}{'row spd':>9}{'col spd':>9}"
          f"{'tau':>6}{'prefill col/row':>16}{'same':>6}")
    for name, ratio in ratios.items():
        row, col = layouts["row"]["modes"][name], layouts["column"]["modes"][name]
        print(f"{name:<14}{row['tokens_per_s']:>10.1f}{col['tokens_per_s']:>10.1f}{ratio['column_over_row']:>8.2f}x"
              f"{ratio['column_over_row_best']:>7.2f}x{row.get('speedup', 0):>8.2f}x{col.get('speedup', 0):>8.2f}x"
              f"{row['tau']:>6.2f}{ratio['prefill_column_over_row']:>15.2f}x"
              f"{'yes' if ratio['identical_tokens'] else 'NO':>6}")
    for layout in LAYOUTS:
        c = layouts[layout]["step_costs"]
        line = ", ".join(f"c({m})/c(1) {v:.2f}" for m, v in c["cost_ratio"].items() if m > 1)
        extra = f"; f {c['f']:.2f}" + (f" (dv {c['f_dv']:.2f})" if "f_dv" in c else "") if "f" in c else ""
        print(f"step costs {layout:<7} c(1) {1e3 * c['full_1_s']:.1f} ms, {line}{extra}")


def markdown(report: dict) -> str:
    """The tables docs/inference.md shows: tokens/s per entry and layout, and the step costs."""
    layouts, ratios = report["layouts"], report["column_over_row"]
    lines = ["| entry | row tok/s | column tok/s | column / row (best) | speedup over standard, row / column | τ | "
             "prefill time column / row | same tokens |", "|---|---|---|---|---|---|---|---|"]
    for name, ratio in ratios.items():
        row, col = layouts["row"]["modes"][name], layouts["column"]["modes"][name]
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {col['tokens_per_s']:.1f} | "
                     f"**{ratio['column_over_row']:.2f}x** ({ratio['column_over_row_best']:.2f}x) | "
                     f"{row.get('speedup', 0):.2f}x / {col.get('speedup', 0):.2f}x | {row['tau']:.2f} | "
                     f"{ratio['prefill_column_over_row']:.2f}x | {'yes' if ratio['identical_tokens'] else 'NO'} |")
    ms = [m for m in layouts["row"]["step_costs"]["full_s"]]
    lines += ["", "| layout | " + " | ".join(f"c({m})" for m in ms) + " | " +
              " | ".join(f"c({m})/c(1)" for m in ms[1:]) + " | f (dv) |", "|---" * (2 * len(ms) + 1) + "|"]
    for layout in LAYOUTS:
        c = layouts[layout]["step_costs"]
        f = f"{c['f']:.2f} ({c['f_dv']:.2f})" if "f_dv" in c else f"{c.get('f', float('nan')):.2f}"
        lines.append(f"| {layout} | " + " | ".join(f"{1e3 * c['full_s'][m]:.1f} ms" for m in ms) + " | " +
                     " | ".join(f"{c['cost_ratio'][m]:.2f}" for m in ms[1:]) + f" | {f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    modes = parse_modes(args.modes)
    draft_lens = list(dict.fromkeys(parse_draft_len(t.strip(), args.max_draft_len) for t in args.draft_len.split(",")))
    if "auto" in draft_lens:
        raise UsageError("--draft-len auto: give fixed draft lengths here (auto would pick per layout)")
    for name in ("prompt_len", "new_tokens", "repeats", "batch_size", "cost_rounds", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.temperature != 0.0:
        raise UsageError("greedy only (the check is identical output of both layouts); drop --temperature")
    resolve_draft_vocab(args)                # a file, the model's own by default, or none
    if args.prompt_corpus and not Path(args.prompt_corpus).is_file():
        raise UsageError(f"--prompt-corpus {args.prompt_corpus}: no such file")
    out = Path(args.output)
    if out.suffix != ".json" or not out.parent.is_dir():
        raise UsageError(f"--output {out}: give a .json file in an existing folder")
    check_model_args(args)
    if args.tp != 1 or args.compile != "off":
        raise UsageError("one process, eager only: drop --tp and --compile")
    import torch

    from inference import weight_layout
    from inference.draft_vocab import load_draft_vocab
    from inference.step_costs import StepCosts

    torch.set_num_threads(args.threads)
    args.weight_layout = "row"
    max_k = max(draft_lens)
    model, tokenizer, device, dtype, description = model_from_args(args, args.prompt_len + args.new_tokens + max_k + 1)
    models = {"row": model, "column": weight_layout.apply(copy.deepcopy(model), "column")}
    assert [weight_layout.layout_of(models[x]) for x in LAYOUTS] == list(LAYOUTS)
    # one draft vocabulary per copy: it caches its copy of the head's rows per weight
    vocabs = {layout: load_draft_vocab(args, model) for layout in LAYOUTS}
    prompts = make_prompts(args, model, tokenizer, args.batch_size * args.repeats)
    batches = [prompts[r * args.batch_size:(r + 1) * args.batch_size] for r in range(args.repeats)]
    todo = entries(modes, draft_lens, [False, True] if args.draft_vocab else [False])
    context = args.prompt_len + args.new_tokens // 2
    costs = {layout: StepCosts(models[layout], prompts[0], context, max_k + 1, batch=args.batch_size,
                               draft_vocab=vocabs[layout]) for layout in LAYOUTS}
    gens = decode_both(models, vocabs, batches, todo, args.new_tokens, args.cost_rounds, costs)
    report = {"model": description, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "prompt_len": args.prompt_len,
              "prompt_source": args.prompt_corpus or ("text" if args.prompt else "random ids"),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "batch_size": args.batch_size,
              "draft_vocab": args.draft_vocab, **summarize(gens, todo, costs)}
    print_table(report)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
