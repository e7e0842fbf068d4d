"""Serve our exports with vLLM and check them against our own decode loop (issue 11; docs/serving.md).

    python benchmarks/vllm_check.py --model HF_DIR [--model HF_DIR ...] [--prompts 8] [--prompt-len 32]
        [--max-new-tokens 64] [--rounds 2] [--vllm-python .venv-vllm/bin/python] [--output runs/vllm_check.json]

HF_DIR is a `pretrain.export_hf --vllm` folder. For each, on the same prompts (the first --prompt-len tokens
of held-out Brown-corpus documents), greedy, fp32, batch 1, exactly --max-new-tokens new tokens each:

- ours: `standard` and `verify` (inference/decoding.py) on the HF_DIR loaded by our own loader;
- vLLM (in its own environment, benchmarks/vllm_side.py): the exported base alone and the base with
  HF_DIR/vllm_speculative_config.json (our module as vLLM's MTP draft), two engines in one process.

Each side alternates its two variants prompt by prompt for --rounds rounds, so tokens/s are side by side.

Checks: (a) vLLM's base text equals our `standard`; (b) with the draft vLLM's text is unchanged and its
draft acceptance rate (accepted / drafted tokens, from its own metrics) is within --tolerance points of
our `verify`'s; (c) tokens/s with and without the draft, side by side. Prints the figures, writes JSON,
exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.cli import OneLineArgumentParser, UsageError, run_main  # noqa: E402

HELD_OUT = ROOT / "assets/corpus/brown.jsonl.zst"
SPEC_FILE = "vllm_speculative_config.json"


def parse_args(argv):
    p = OneLineArgumentParser(prog="python benchmarks/vllm_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="HF_DIR", help="an export_hf --vllm folder")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (Brown documents)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed repeats (interleaved); text and acceptance "
                   "come from the first")
    p.add_argument("--tolerance", type=float, default=5.0, help="acceptance-rate points allowed between vLLM and us")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"),
                   help="python of the vLLM environment (`make vllm-env` creates it)")
    p.add_argument("--output", default="runs/vllm_check.json")
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "max_new_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for hf in args.model:
        if not (Path(hf) / "config.json").is_file():
            raise UsageError(f"--model {hf}: no config.json; pass a folder written by pretrain.export_hf")
        if not (Path(hf) / SPEC_FILE).is_file():
            raise UsageError(f"--model {hf}: no {SPEC_FILE}; re-export with `python -m pretrain.export_hf ... --vllm`")
    if not Path(args.vllm_python).is_file():
        raise UsageError(f"--vllm-python {args.vllm_python} does not exist; create the vLLM environment with "
                         "`make vllm-env`")
    return args


def held_out_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` Brown documents that are long enough."""
    import zstandard

    prompts = []
    with open(HELD_OUT, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            ids = tokenizer.encode(" ".join(json.loads(line)["text"].split()))
            if len(ids) >= length:
                prompts.append(ids[:length])
            if len(prompts) == count:
                return prompts
    raise UsageError(f"{HELD_OUT} has fewer than {count} documents of {length} tokens; lower --prompts/--prompt-len")


def ours(model, prompts, max_new_tokens: int, draft_tokens: int, rounds: int) -> dict:
    """Our standard and verify on every prompt, alternating prompt by prompt for `rounds` rounds (the
    machine's load drifts into both alike); tokens from the first round."""
    import inspect

    from inference.decoding import greedy_generate

    verify_kwargs = {}
    if draft_tokens > 1:
        if "draft_len" not in inspect.signature(greedy_generate).parameters:
            raise UsageError(f"the export drafts {draft_tokens} tokens but this checkout's verify mode drafts one")
        verify_kwargs = {"draft_len": draft_tokens}
    kwargs = {"standard": {}, "verify": verify_kwargs}
    result = {m: {"tokens": [], "new_tokens": 0, "seconds": 0.0, "proposed": 0, "accepted": 0} for m in kwargs}
    for mode in kwargs:
        greedy_generate(model, prompts[0], mode, 8, **kwargs[mode])     # warm-up
    for r in range(rounds):
        for i, ids in enumerate(prompts):
            for mode in (("standard", "verify") if (r + i) % 2 == 0 else ("verify", "standard")):
                gen = greedy_generate(model, ids, mode, max_new_tokens, **kwargs[mode])
                v = result[mode]
                v["new_tokens"] += len(gen.tokens)
                v["seconds"] += gen.stats.seconds
                if r == 0:
                    v["tokens"].append(gen.tokens)
                    v["proposed"] += gen.stats.proposed
                    v["accepted"] += gen.stats.accepted
        print(f"ours round {r + 1}/{rounds}: " + ", ".join(
            f"{m} {v['new_tokens'] / v['seconds']:.1f} tokens/s" for m, v in result.items()), flush=True)
    for v in result.values():
        v["tokens_per_s"] = v["new_tokens"] / v["seconds"]
        v["acceptance_rate"] = v["accepted"] / v["proposed"] if v["proposed"] else None
    return result


def vllm(vllm_python: str, hf: Path, prompts, max_new_tokens: int, max_model_len: int, rounds: int) -> dict:
    """benchmarks/vllm_side.py in the vLLM environment: {"base": ..., "draft": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "prompts.json").write_text(json.dumps(prompts))
        out = Path(tmp) / "out.json"
        cmd = [vllm_python, str(ROOT / "benchmarks/vllm_side.py"), "--model", str(hf), "--prompts",
               str(Path(tmp) / "prompts.json"), "--max-new-tokens", str(max_new_tokens), "--max-model-len",
               str(max_model_len), "--rounds", str(rounds), "--output", str(out)]
        print(f"$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"vLLM failed (exit {proc.returncode}) on {hf}:\n{proc.stdout[-4000:]}")
        result = json.loads(out.read_text())
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("vllm round")))
        print(f"  vLLM engines started in {result['base']['load_seconds']:.0f} s (base) and "
              f"{result['draft']['load_seconds']:.0f} s (with draft); whole run {time.perf_counter() - start:.0f} s")
        return result


def first_difference(a: list[list[int]], b: list[list[int]]):
    """(prompt index, token index) of the first disagreement, or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        for j, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return i, j
        if len(x) != len(y):
            return i, min(len(x), len(y))
    return None


def check_model(args, hf: Path) -> dict:
    import torch

    from inference.loading import load_model_dir

    spec = json.loads((hf / SPEC_FILE).read_text())
    k = int(spec.get("num_speculative_tokens", 1))
    model, tokenizer = load_model_dir(hf, torch.float32, torch.device("cpu"))
    if tokenizer is None:
        raise UsageError(f"--model {hf}: no tokenizer files; export from a run that has one")
    prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_len)
    need = args.prompt_len + args.max_new_tokens + k + 1
    if need > model.cfg.max_seq_len:
        raise UsageError(f"--prompt-len + --max-new-tokens must leave room for {k + 1} drafted positions in the "
                         f"model's {model.cfg.max_seq_len}-token context")
    max_model_len = min(model.cfg.max_seq_len, need + 64)    # a small KV cache: long contexts need none here
    print(f"\n== {hf}: {len(prompts)} prompts x {args.prompt_len} tokens, {args.max_new_tokens} new tokens, "
          f"{k} draft token(s)", flush=True)
    mine = ours(model, prompts, args.max_new_tokens, k, args.rounds)
    served = vllm(args.vllm_python, hf, prompts, args.max_new_tokens, max_model_len, args.rounds)
    base, drafted = served["base"], served["draft"]
    vllm_rate = drafted["accepted_tokens"] / drafted["draft_tokens"] if drafted["draft_tokens"] else None
    our_rate = mine["verify"]["acceptance_rate"]
    diff_a = first_difference(base["tokens"], mine["standard"]["tokens"])
    diff_b = first_difference(drafted["tokens"], base["tokens"])
    checks = {"a_base_equals_standard": diff_a is None, "b_draft_text_unchanged": diff_b is None,
              "b_acceptance_within_tolerance": vllm_rate is not None and our_rate is not None
              and abs(vllm_rate - our_rate) * 100 <= args.tolerance}
    return {"model": str(hf), "speculative_config": spec, "prompts": len(prompts), "prompt_len": args.prompt_len,
            "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "checks": checks,
            "first_difference": {"a": diff_a, "b": diff_b},
            "acceptance": {"ours_verify": our_rate, "vllm": vllm_rate, "vllm_drafts": drafted["drafts"],
                           "vllm_draft_tokens": drafted["draft_tokens"],
                           "vllm_accepted_tokens": drafted["accepted_tokens"],
                           "ours_proposed": mine["verify"]["proposed"], "ours_accepted": mine["verify"]["accepted"]},
            "tokens_per_s": {"vllm_base": base["tokens_per_s"], "vllm_draft": drafted["tokens_per_s"],
                             "vllm_speedup": drafted["tokens_per_s"] / base["tokens_per_s"],
                             "ours_standard": mine["standard"]["tokens_per_s"],
                             "ours_verify": mine["verify"]["tokens_per_s"],
                             "ours_speedup": mine["verify"]["tokens_per_s"] / mine["standard"]["tokens_per_s"]},
            "vllm_engine_start_s": {"base": base["load_seconds"], "draft": drafted["load_seconds"]},
            "torch_threads_ours": torch.get_num_threads()}


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f} %"


def print_report(results: list[dict]):
    print("\nmodel                              check (a)  check (b)  accept ours  accept vLLM   "
          "vLLM tok/s base  +draft  speedup   ours std  verify  speedup")
    for r in results:
        c, a, t = r["checks"], r["acceptance"], r["tokens_per_s"]
        ok_b = c["b_draft_text_unchanged"] and c["b_acceptance_within_tolerance"]
        print(f"{Path(r['model']).name[:34]:34} {'pass' if c['a_base_equals_standard'] else 'FAIL':>9}  "
              f"{'pass' if ok_b else 'FAIL':>9}  {pct(a['ours_verify']):>11}  {pct(a['vllm']):>11}   "
              f"{t['vllm_base']:>15.1f}  {t['vllm_draft']:>6.1f}  {t['vllm_speedup']:>6.2f}x   "
              f"{t['ours_standard']:>8.1f}  {t['ours_verify']:>6.1f}  {t['ours_speedup']:>6.2f}x")


def main(argv=None) -> int:
    args = parse_args(argv)
    results = [check_model(args, Path(hf).resolve()) for hf in args.model]
    print_report(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"command": " ".join(["python benchmarks/vllm_check.py", *(argv or sys.argv[1:])]),
                               "results": results}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    failed = [f"{r['model']}: {name}" for r in results for name, ok in r["checks"].items() if not ok]
    if failed:
        print("vllm-check FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
