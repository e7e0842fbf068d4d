"""Greedy text generation in one of the decoding modes (DESIGN.md §2, §4).

    python -m inference.generate --model RUN_DIR|HF_DIR --prompt TEXT --mode standard|recycle|verify
    python -m inference.generate --preset 125m --random-init --prompt TEXT --mode verify

The text goes to stdout; one line of statistics (tokens/s, full forwards, tau, acceptance) to stderr.
"""
from __future__ import annotations

import sys

from inference.cli import OneLineArgumentParser, UsageError, add_model_args, check_model_args, model_from_args, run_main
from inference.decoding import MODES


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m inference.generate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--mode", choices=MODES, default="standard")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    return p


def stats_line(stats) -> str:
    line = (f"[{stats.mode}] {stats.new_tokens} tokens in {stats.seconds:.2f} s: {stats.tokens_per_s:.1f} tokens/s; "
            f"{stats.full_forwards} full forwards (tau {stats.tau:.2f}), {stats.module_forwards} module forwards")
    if stats.acceptance_rate is not None:
        line += f", acceptance {100 * stats.acceptance_rate:.0f}% of {stats.proposed}"
    return line


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    check_model_args(args)

    from inference.decoding import greedy_generate

    model, tokenizer, _, _, _ = model_from_args(args, cache_len=args.max_new_tokens + 2)
    if tokenizer is None:
        raise UsageError(f"no tokenizer for a {model.cfg.vocab_size}-token vocabulary; pass --tokenizer DIR")
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UsageError("the prompt is empty after tokenization; pass some text with --prompt")
    if max(prompt_ids) >= model.cfg.vocab_size:
        raise UsageError(f"the tokenizer produced id {max(prompt_ids)} but the model has only "
                         f"{model.cfg.vocab_size} tokens; pass the matching --tokenizer DIR")
    eos = None if args.ignore_eos else tokenizer.eos_token_id
    out = greedy_generate(model, prompt_ids, args.mode, args.max_new_tokens, eos_id=eos)
    print(tokenizer.decode(prompt_ids + out.tokens, skip_special_tokens=True))
    print(stats_line(out.stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
