"""Linear weight layouts (`--weight-layout`, inference/weight_layout.py) side by side: row, column, packed.

Loads the model once, keeps a copy per other layout, and decodes the same prompts with all of them in one
process: every repeat runs every entry (standard, recycle, verify at each --draft-len, with and without the
draft vocabulary) on every copy, the order rotating per repeat, and between repeats samples each copy's step
costs (inference/step_costs.py). The figures to read are ratios over the first layout (row), since the machine
is shared and noisy; greedy output of every layout must be identical to the first one's (checked per entry).

    python benchmarks/weight_layout.py --model runs/smollm2-recycle --prompt-corpus assets/corpus/brown.jsonl.zst \\
        --draft-len 1,2,3 --draft-vocab runs/smollm2-recycle/draft_vocab.safetensors --threads 1 \\
        --prompt-len 32 --new-tokens 48 --repeats 4 --cost-rounds 12 --output runs/bench/weight_layout_fp32.json

Writes FILE.json (per layout and entry: tokens/s runs, median, best, tau, prefill; step costs; ratios over the
first layout) and FILE.md (the tables of docs/inference.md).
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

from inference.weight_layout import LAYOUTS  # noqa: E402


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
    p.add_argument("--layouts", default="row,column,packed", help="comma-separated, the first is the baseline of "
                   "the ratios: from row, column, packed")
    return p


def decode_all(models, vocabs, batches, todo, new_tokens, cost_rounds: int, costs) -> dict:
    from inference.decoding import generate_batch

    def run(layout, entry, prompts, n):
        return generate_batch(models[layout], prompts, entry["mode"], n, draft_len=entry["draft_len"],
                              draft_vocab=vocabs[layout] if entry["draft_vocab"] else None)

    layouts = list(models)
    for layout in layouts:                   # warmup: allocator, kernels, the draft vocabulary's row copy
        for entry in todo:
            run(layout, entry, batches[0], min(new_tokens, 8))
    pairs = [(layout, e) for e in todo for layout in layouts]
    gens = {(layout, e["name"]): [] for layout, e in pairs}
    for r, prompts in enumerate(batches):
        shift = r % len(pairs)
        for layout, entry in pairs[shift:] + pairs[:shift]:
            gens[(layout, entry["name"])].append(run(layout, entry, prompts, new_tokens))
        for layout in (layouts if r % 2 == 0 else layouts[::-1]):
            costs[layout].sample(-(-cost_rounds // len(batches)))
    return gens


def summarize(gens, todo, costs) -> dict:
    layouts = list(costs)
    base = layouts[0]
    out = {layout: {"modes": {}, "step_costs": costs[layout].summary()} for layout in layouts}
    for layout in layouts:
        for entry in todo:
            runs = gens[(layout, entry["name"])]
            stats = [s for g in runs for s in g.stats]
            tps = [g.tokens_per_s for g in runs]
            out[layout]["modes"][entry["name"]] = {
                "mode": entry["mode"], "draft_len": entry["draft_len"], "draft_vocab": entry["draft_vocab"],
                "tokens_per_s": statistics.median(tps), "tokens_per_s_best": max(tps), "tokens_per_s_runs": tps,
                "tau": sum(s.new_tokens for s in stats) / sum(s.full_forwards for s in stats),
                "prefill_s": statistics.median(s.prefill_seconds for s in stats)}
    tokens = {key: [[r.tokens for r in g.rows] for g in runs] for key, runs in gens.items()}
    ratios = {}                              # entry -> layout -> its figures over the baseline layout's
    for entry in todo:
        ref = out[base]["modes"][entry["name"]]
        ratios[entry["name"]] = {layout: {
            "tokens_per_s": out[layout]["modes"][entry["name"]]["tokens_per_s"] / ref["tokens_per_s"],
            "tokens_per_s_best": out[layout]["modes"][entry["name"]]["tokens_per_s_best"] / ref["tokens_per_s_best"],
            "prefill_s": out[layout]["modes"][entry["name"]]["prefill_s"] / ref["prefill_s"],
            "identical_tokens": tokens[(layout, entry["name"])] == tokens[(base, entry["name"])]}
            for layout in layouts[1:]}
    for layout in layouts:                   # each layout's own speedup over its own standard
        std = out[layout]["modes"].get("standard")
        for res in out[layout]["modes"].values():
            if std:
                res["speedup"] = res["tokens_per_s"] / std["tokens_per_s"]
                res["speedup_best"] = res["tokens_per_s_best"] / std["tokens_per_s_best"]
    cost_ratios = {layout: {key: out[layout]["step_costs"][key] / out[base]["step_costs"][key]
                            for key in ("full_1_s", "module_1_s", "module_1_dv_s") if key in out[base]["step_costs"]}
                   for layout in layouts[1:]}
    return {"baseline": base, "layouts": out, "over_baseline": ratios, "step_cost_over_baseline": cost_ratios}


def print_table(report: dict):
    layouts, base = report["layouts"], report["baseline"]
    others = [x for x in layouts if x != base]
    print(f"{report['model']}  {report['dtype']}, {report['threads']} thread(s), prompt {report['prompt_len']}, "
          f"{report['new_tokens']} new tokens, batch {report['batch_size']}, {report['repeats']} repeats")
    print(f"{'entry':<14}" + "".join(f"{x + ' tok/s':>14}" for x in layouts) + "".join(f"{x + '/' + base:>15}"
          for x in others) + "".join(f"{x + ' spd':>12}" for x in layouts) + f"{'tau':>6}{'same':>6}")
    for name, ratio in report["over_baseline"].items():
        print(f"{name:<14}" + "".join(f"{layouts[x]['modes'][name]['tokens_per_s']:>14.1f}" for x in layouts)
              + "".join(f"{ratio[x]['tokens_per_s']:>14.2f}x" for x in others)
              + "".join(f"{layouts[x]['modes'][name].get('speedup', 0):>11.2f}x" for x in layouts)
              + f"{layouts[base]['modes'][name]['tau']:>6.2f}"
              + f"{'yes' if all(ratio[x]['identical_tokens'] for x in others) else 'NO':>6}")
    for layout in layouts:
        c = layouts[layout]["step_costs"]
        line = ", ".join(f"c({m})/c(1) {v:.2f}" for m, v in c["cost_ratio"].items() if m > 1)
        extra = f"; f {c['f']:.2f}" + (f" (dv {c['f_dv']:.2f})" if "f_dv" in c else "") if "f" in c else ""
        print(f"step costs {layout:<7} c(1) {1e3 * c['full_1_s']:.1f} ms, {line}{extra}")


def markdown(report: dict) -> str:
    """The tables docs/inference.md shows: tokens/s per entry and layout, and the step costs."""
    layouts, base = report["layouts"], report["baseline"]
    others = [x for x in layouts if x != base]
    lines = ["| entry | " + " | ".join(f"{x} tok/s" for x in layouts) + " | "
             + " | ".join(f"{x} / {base} (best)" for x in others) + " | speedup over standard, "
             + " / ".join(layouts) + " | τ | prefill time " + ", ".join(f"{x} / {base}" for x in others)
             + " | same tokens |", "|---" * (len(layouts) + len(others) + 5) + "|"]
    for name, ratio in report["over_baseline"].items():
        modes = {x: layouts[x]["modes"][name] for x in layouts}
        lines.append(f"| {name} | " + " | ".join(f"{modes[x]['tokens_per_s']:.1f}" for x in layouts) + " | "
                     + " | ".join(f"**{ratio[x]['tokens_per_s']:.2f}x** ({ratio[x]['tokens_per_s_best']:.2f}x)"
                                  for x in others) + " | "
                     + " / ".join(f"{modes[x].get('speedup', 0):.2f}x" for x in layouts)
                     + f" | {modes[base]['tau']:.2f} | " + ", ".join(f"{ratio[x]['prefill_s']:.2f}x" for x in others)
                     + f" | {'yes' if all(ratio[x]['identical_tokens'] for x in others) else 'NO'} |")
    ms = [m for m in layouts[base]["step_costs"]["full_s"]]
    lines += ["", "| layout | " + " | ".join(f"c({m})" for m in ms) + " | " +
              " | ".join(f"c({m})/c(1)" for m in ms[1:]) + " | f (dv) |", "|---" * (2 * len(ms) + 1) + "|"]
    for layout in layouts:
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
        raise UsageError("greedy only (the check is identical output of every layout); drop --temperature")
    layouts = list(dict.fromkeys(x.strip() for x in args.layouts.split(",")))
    if len(layouts) < 2 or not set(layouts) <= set(LAYOUTS) - {"auto"}:
        raise UsageError(f"--layouts {args.layouts}: give two or more of row, column, packed")
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
    # copies first: a packed model cannot be deep-copied (its oneDNN twins have no storage to copy)
    models = {x: model if x == layouts[0] else copy.deepcopy(model) for x in layouts}
    models = {x: weight_layout.apply(models[x], weight_layout.resolve(x, device, dtype)) for x in layouts}
    assert [weight_layout.layout_of(models[x]) for x in layouts] == layouts
    # one draft vocabulary per copy: it caches its copy of the head's rows per weight
    vocabs = {layout: load_draft_vocab(args, model) for layout in layouts}
    prompts = make_prompts(args, model, tokenizer, args.batch_size * args.repeats)
    batches = [prompts[r * args.batch_size:(r + 1) * args.batch_size] for r in range(args.repeats)]
    todo = entries(modes, draft_lens, [False, True] if args.draft_vocab else [False])
    context = args.prompt_len + args.new_tokens // 2
    costs = {layout: StepCosts(models[layout], prompts[0], context, max_k + 1, batch=args.batch_size,
                               draft_vocab=vocabs[layout]) for layout in layouts}
    gens = decode_all(models, vocabs, batches, todo, args.new_tokens, args.cost_rounds, costs)
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
