"""Decoding speed of the modes side by side, judged against the structural bound (DESIGN.md §2).

    python -m inference.benchmark --preset 125m --random-init --modes standard,recycle,verify --output b.json

All modes run in one process on the same prompt, with interleaved repeats (the mode order rotates each
repeat) after a warmup, so that machine noise hits every mode alike. EOS is ignored: every run emits
exactly --new-tokens tokens. Besides tokens/s it measures, at the mid-generation cache length:

    c(M)/c(1)  cost of an M-token full step (forward + LM head on the last position) relative to 1 token
    f          cost of a 2-position module step (+ LM head) relative to a 1-token full step
    bound      2 / (c(2)/c(1) + f): the best recycle speedup over standard these costs allow; verify's is
               (1 + acceptance) / (c(2)/c(1) + f)

Writes FILE.json with everything and FILE.png (tokens/s per mode, the recycle bound as a line).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

from inference.cli import OneLineArgumentParser, UsageError, add_model_args, check_model_args, model_from_args, run_main
from inference.decoding import MODES


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m inference.benchmark", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    p.add_argument("--output", required=True, metavar="FILE.json", help="results; the plot goes next to it (.png)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", help="text (tiled to --prompt-len tokens) instead of random token ids")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    return p


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--modes {text!r}: unknown mode(s) {bad}; valid: {','.join(MODES)}")
    return list(dict.fromkeys(modes))


def make_prompt(args, model, tokenizer) -> list[int]:
    import torch

    if args.prompt:
        if tokenizer is None:
            raise UsageError("--prompt needs a tokenizer; pass --tokenizer DIR or drop --prompt (random ids)")
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise UsageError("--prompt is empty after tokenization")
        return (ids * (args.prompt_len // len(ids) + 1))[:args.prompt_len]
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, model.cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()


class StepCosts:
    """Seconds of a 1- and 2-token full step and a 2-position module step at `context_len` cached positions,
    each followed by the LM head on its last position as in decoding, and rolled back afterwards so every
    sample sees the same cache length. `sample` is called between the decoding repeats, so these timings
    and the tokens/s share the machine's load; `summary` takes medians."""

    def __init__(self, model, prompt: list[int], context_len: int):
        import torch

        self.model, self.context_len = model, context_len
        device = next(model.parameters()).device
        self.ids = torch.tensor([(prompt * (context_len // len(prompt) + 2))[:context_len + 3]], device=device)
        self.base, self.module = model.new_caches(1, context_len + 4, device=device)
        with torch.inference_mode():
            h = model.base_step(self.ids[:, :context_len], self.base)
            if self.module is not None:
                model.module_step(h, self.ids[:, 1:context_len + 1], self.module)
            self.h2 = model.base_step(self.ids[:, context_len:context_len + 2], self.base)
            self.base.rollback(2)
        self.kinds = {"full_1": lambda: self._full(1), "full_2": lambda: self._full(2)}
        if self.module is not None:
            self.kinds["module_2"] = self._module
        self.times = {k: [] for k in self.kinds}
        self.sample(2, keep=False)           # warmup

    def _full(self, m: int):
        c = self.context_len
        self.model.logits(self.model.base_step(self.ids[:, c:c + m], self.base)[0, -1:]).argmax(-1).tolist()
        self.base.rollback(m)

    def _module(self):
        c = self.context_len
        self.model.logits(self.model.module_step(self.h2, self.ids[:, c + 1:c + 3], self.module)[0, -1:]).argmax(-1).tolist()
        self.module.rollback(2)

    def sample(self, rounds: int, keep: bool = True):
        import torch

        with torch.inference_mode():
            for _ in range(rounds):
                for name, fn in self.kinds.items():
                    start = time.perf_counter()
                    fn()
                    if keep:
                        self.times[name].append(time.perf_counter() - start)

    def summary(self) -> dict:
        t = {k: statistics.median(v) for k, v in self.times.items()}
        out = {"context_len": self.context_len, "samples": len(self.times["full_1"]), "full_1_s": t["full_1"],
               "full_2_s": t["full_2"], "c2_over_c1": t["full_2"] / t["full_1"]}
        if "module_2" in t:
            out.update(module_2_s=t["module_2"], f=t["module_2"] / t["full_1"])
            out["recycle_bound"] = 2 / (out["c2_over_c1"] + out["f"])
        return out


def run_modes(model, prompt, modes, new_tokens, repeats, costs: StepCosts, cost_rounds: int = 60) -> dict:
    from inference.decoding import greedy_generate

    for mode in modes:                        # warmup: allocator, kernels, first-call overheads
        greedy_generate(model, prompt, mode, min(new_tokens, 8))
    runs = {m: [] for m in modes}
    tokens = {}
    for r in range(repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            g = greedy_generate(model, prompt, mode, new_tokens)
            runs[mode].append(g.stats)
            tokens[mode] = g.tokens
        costs.sample(-(-cost_rounds // repeats))
    results = {}
    for mode, stats in runs.items():
        tps = [s.tokens_per_s for s in stats]
        last = stats[-1]
        results[mode] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_best": max(tps), "tokens_per_s_runs": tps,
                         "tau": last.tau, "acceptance_rate": last.acceptance_rate,
                         "full_forwards": last.full_forwards, "module_forwards": last.module_forwards,
                         "new_tokens": last.new_tokens, "prefill_s": statistics.median(s.prefill_seconds for s in stats)}
    if "standard" in results:
        for mode, res in results.items():
            res["speedup"] = res["tokens_per_s"] / results["standard"]["tokens_per_s"]
            # Load from other processes only ever slows a run down: best-of-runs is a second, less noisy view.
            res["speedup_best"] = res["tokens_per_s_best"] / results["standard"]["tokens_per_s_best"]
        if "verify" in results:              # lossless means identical tokens; check it on every benchmark
            results["verify"]["identical_to_standard"] = tokens["verify"] == tokens["standard"]
    return results


def print_table(report: dict):
    costs, results = report["step_costs"], report["modes"]
    print(f"{report['model']}  ({report['parameters']['total'] / 1e6:.1f}M params, {report['device']}, "
          f"{report['dtype']}, {report['threads']} threads)  prompt {report['prompt_len']}, "
          f"{report['new_tokens']} new tokens, {report['repeats']} repeats")
    print(f"{'mode':<10}{'tokens/s':>10}{'speedup':>9}{'best tok/s':>12}{'speedup':>9}{'tau':>7}{'accept':>8}"
          f"{'full fwd':>10}{'module fwd':>12}")
    for mode, r in results.items():
        acc = "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        best = f"{r['speedup_best']:.2f}x" if "speedup" in r else "-"
        print(f"{mode:<10}{r['tokens_per_s']:>10.1f}{speed:>9}{r['tokens_per_s_best']:>12.1f}{best:>9}{r['tau']:>7.2f}"
              f"{acc:>8}{r['full_forwards']:>10}{r['module_forwards']:>12}")
    line = (f"step costs at {costs['context_len']} cached positions: c(1) {1e3 * costs['full_1_s']:.2f} ms, "
            f"c(2)/c(1) {costs['c2_over_c1']:.2f}")
    if "f" in costs:
        line += f", f {costs['f']:.2f}; recycle bound 2/(c(2)/c(1)+f) = {costs['recycle_bound']:.2f}x"
        if "verify_bound" in costs:
            line += f", verify bound {costs['verify_bound']:.2f}x"
    print(line)
    if "verify" in results and "identical_to_standard" in results["verify"]:
        print(f"verify output identical to standard: {results['verify']['identical_to_standard']}")


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["modes"]
    modes = list(results)
    med = [results[m]["tokens_per_s"] for m in modes]
    lo = [med[i] - min(results[m]["tokens_per_s_runs"]) for i, m in enumerate(modes)]
    hi = [max(results[m]["tokens_per_s_runs"]) - med[i] for i, m in enumerate(modes)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(modes, med, yerr=[lo, hi], capsize=4, color=["#888", "#3a7", "#37a"][:len(modes)])
    for i, m in enumerate(modes):
        note = (f"{results[m]['speedup']:.2f}x, " if "speedup" in results[m] else "") + f"tau {results[m]['tau']:.2f}"
        ax.text(i, med[i] / 2, note, ha="center", va="center", color="white", fontsize=9)
    bound = report["step_costs"].get("recycle_bound")
    if bound and "standard" in results:
        ax.axhline(bound * results["standard"]["tokens_per_s"], ls="--", color="k", lw=1,
                   label=f"recycle bound {bound:.2f}x")
        ax.legend(loc="lower right")
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title(f"{report['model']}, {report['device']} {report['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    modes = parse_modes(args.modes)
    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    out = Path(args.output)
    if out.suffix != ".json" or not out.parent.is_dir():
        raise UsageError(f"--output {out}: give a .json file in an existing folder")
    check_model_args(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, device, dtype, description = model_from_args(args, args.prompt_len + args.new_tokens + 2)
    if model.recycle is None and set(modes) - {"standard"}:
        raise UsageError("this model has no recyclable module (recycle_layers = 0); use --modes standard")
    if args.prompt_len + args.new_tokens > model.cfg.max_seq_len:
        raise UsageError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's "
                         f"context of {model.cfg.max_seq_len} tokens; lower one of them")
    prompt = make_prompt(args, model, tokenizer)
    costs = StepCosts(model, prompt, args.prompt_len + args.new_tokens // 2)   # the mid-generation length
    results = run_modes(model, prompt, modes, args.new_tokens, args.repeats, costs)
    costs = costs.summary()
    if "verify" in results and "f" in costs:
        costs["verify_bound"] = (1 + results["verify"]["acceptance_rate"]) / (costs["c2_over_c1"] + costs["f"])
    report = {"model": description, "parameters": model.cfg.num_parameters(), "config": model.cfg.to_dict(),
              "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "host": platform.node(), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "modes": results, "step_costs": costs}
    print_table(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
