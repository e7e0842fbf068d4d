"""The vLLM half of benchmarks/vllm_check.py; runs inside the separate vLLM environment (.venv-vllm).

    .venv-vllm/bin/python benchmarks/vllm_side.py --model HF_DIR --prompts IDS.json --max-new-tokens N
        --max-model-len L [--rounds R] --output OUT.json

Starts two engines on HF_DIR: the exported base alone, and the base with HF_DIR/vllm_speculative_config.json
(written by `pretrain.export_hf --vllm`) unchanged. Greedy, fp32, exactly N new tokens per prompt (EOS
ignored), one prompt per `generate` call (batch 1, as our decode loop), prefix caching off (repeats
would skip prefill). The two engines alternate prompt by prompt for R rounds, so a shared machine's load
drifts into both sides alike. Writes each engine's new tokens (first round), decode seconds, and vLLM's
own speculative-decoding counters (drafts, drafted tokens, accepted tokens) over the measured calls.
Imports nothing from this repository: vLLM's environment has none of our dependencies. vLLM starts
worker processes by spawning, hence the `__main__` guard.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SPEC_FILE = "vllm_speculative_config.json"
COUNTERS = {"drafts": "vllm:spec_decode_num_drafts", "draft_tokens": "vllm:spec_decode_num_draft_tokens",
            "accepted_tokens": "vllm:spec_decode_num_accepted_tokens"}


def counters(llm) -> dict:
    values = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    return {key: int(values.get(name) or 0) for key, name in COUNTERS.items()}


def run(model: Path, prompts: list[list[int]], max_new_tokens: int, max_model_len: int, rounds: int) -> dict:
    from vllm import LLM, SamplingParams

    spec = json.loads((model / SPEC_FILE).read_text())
    engines, result = {}, {}
    for name, extra in (("base", {}), ("draft", {"speculative_config": spec})):
        start = time.perf_counter()
        engines[name] = LLM(model=str(model), dtype="float32", max_model_len=max_model_len, seed=0,
                            disable_log_stats=False, enable_prefix_caching=False, **extra)
        result[name] = {"load_seconds": time.perf_counter() - start, "tokens": [], "seconds": 0.0, "new_tokens": 0}
        # warm-up: the first call pays for allocation and graph capture
        engines[name].generate([{"prompt_token_ids": prompts[0]}],
                               SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    before = counters(engines["draft"])
    for r in range(rounds):
        for i, ids in enumerate(prompts):
            order = ("base", "draft") if (r + i) % 2 == 0 else ("draft", "base")
            for name in order:
                t = time.perf_counter()
                out = engines[name].generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)
                result[name]["seconds"] += time.perf_counter() - t
                tokens = list(out[0].outputs[0].token_ids)
                result[name]["new_tokens"] += len(tokens)
                if r == 0:
                    result[name]["tokens"].append(tokens)
        print(f"vllm round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {v['new_tokens'] / v['seconds']:.1f} tokens/s" for n, v in result.items()), file=sys.stderr,
            flush=True)
    after = counters(engines["draft"])
    for v in result.values():
        v["tokens_per_s"] = v["new_tokens"] / v["seconds"]
    # The counters are process-wide; only the draft engine drafts. Per round they repeat exactly (greedy).
    result["draft"].update({k: after[k] - before[k] for k in COUNTERS}, speculative_config=spec)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vllm_side.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--prompts", required=True, type=Path, help="JSON list of token-id lists")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args(argv)
    if not (args.model / SPEC_FILE).is_file():
        print(f"error: {args.model}/{SPEC_FILE} is missing; export with `python -m pretrain.export_hf ... --vllm`",
              file=sys.stderr)
        return 2
    result = run(args.model, json.loads(args.prompts.read_text()), args.max_new_tokens, args.max_model_len,
                 args.rounds)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
