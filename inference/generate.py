"""Text generation in one of the decoding modes (DESIGN.md §2, §4).

    python -m inference.generate --model RUN_DIR|HF_DIR --prompt TEXT --mode standard|recycle|verify
        [--draft-len K|auto] [--draft-width W] [--lookup L] [--temperature T --top-p P --top-k K --seed S]
        [--draft-vocab FILE]
    python -m inference.generate --model DIR --batch-file prompts.txt --mode verify     # one prompt per line
    python -m inference.generate --preset 125m --random-init --prompt TEXT --mode verify
    torchrun --nproc-per-node 2 -m inference.generate --model RUN_DIR --tp 2 --prompt TEXT --mode verify

The text goes to stdout (with --batch-file: one block per prompt, in order, separated by a blank line);
one line of statistics per prompt (tokens/s, full forwards, tau, acceptance) to stderr.
Under a launcher every rank runs the same decode loop on its tensor-parallel shard; rank 0 alone prints.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from inference.cli import (OneLineArgumentParser, UsageError, add_decoding_args, add_model_args, check_draft_width,
                           check_model_args, model_from_args, parse_draft_len, parse_draft_widths, parse_lookups,
                           run_main, sampling_from_args)
from inference.decoding import MODES
from inference.draft_vocab import load_draft_vocab


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m inference.generate", description=__doc__.split("\n")[0])
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--batch-file", metavar="FILE", help="one prompt per line, decoded together as a batch")
    p.add_argument("--mode", choices=MODES, default="standard")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    add_decoding_args(p)
    return p


def stats_line(stats) -> str:
    line = (f"[{stats.mode}] {stats.new_tokens} tokens in {stats.seconds:.2f} s: {stats.tokens_per_s:.1f} tokens/s; "
            f"{stats.full_forwards} full forwards (tau {stats.tau:.2f}), {stats.module_forwards} module forwards")
    if stats.acceptance_rate is not None:
        line += f", acceptance {100 * stats.acceptance_rate:.0f}% of {stats.proposed} (draft length {stats.draft_len}"
        tree = [f"width {stats.draft_width}"] if stats.draft_width != 1 else []
        tree += [f"lookup {stats.lookup}"] if stats.lookup else []
        line += "".join(f", {part}" for part in tree) + ")"
    if stats.batch_size > 1:
        line += f"; batch of {stats.batch_size}"
    return line


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.batch_file)
    if not path.is_file():
        raise UsageError(f"--batch-file {path}: no such file; give a text file with one prompt per line")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--batch-file {path} has no prompts; put one prompt per line")
    return prompts


def main(argv=None) -> int:
    # stdout carries the generated text and nothing else, so it can be piped. Libraries that print while loading
    # (DeepSpeed's logger writes its accelerator line to whatever stdout was when it was first imported) go to
    # stderr: everything runs with stdout pointed there, and only the text is printed to the real one.
    text_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _main(argv, text_out)


def _main(argv, text_out) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    draft_len = parse_draft_len(args.draft_len, args.max_draft_len)
    sampling = sampling_from_args(args)
    texts = read_prompts(args)
    widths = parse_draft_widths(args.draft_width)
    if len(widths) > 1:
        raise UsageError(f"--draft-width {args.draft_width}: give one width here (the benchmark compares several)")
    lookups = parse_lookups(args.lookup)
    if len(lookups) > 1:
        raise UsageError(f"--lookup {args.lookup}: give one length here (the benchmark compares several)")
    args.draft_width, args.lookup = widths[0], lookups[0]                    # parsed once: ints from here on
    check_draft_width(args.draft_width, args.mode, draft_len, len(texts), args.lookup)
    check_model_args(args)

    from inference import tp_loading

    model, tokenizer, _, _, _ = model_from_args(args, cache_len=args.max_new_tokens + 2)
    try:
        return generate(args, model, tokenizer, texts, draft_len, sampling, text_out)
    finally:
        tp_loading.finish()


def generate(args, model, tokenizer, texts, draft_len, sampling, text_out) -> int:
    """Every rank runs this (same prompts, same decode loop and seeded sampling on its shard); rank 0 prints."""
    from inference import tp_loading
    from inference.decoding import generate_batch

    if tokenizer is None:
        raise UsageError(f"no tokenizer for a {model.cfg.vocab_size}-token vocabulary; pass --tokenizer DIR")
    prompts = [tokenizer.encode(t) for t in texts]
    if not all(prompts):
        raise UsageError("a prompt is empty after tokenization; pass some text")
    top = max(max(p) for p in prompts)
    if top >= model.cfg.vocab_size:
        raise UsageError(f"the tokenizer produced id {top} but the model has only "
                         f"{model.cfg.vocab_size} tokens; pass the matching --tokenizer DIR")
    eos = None if args.ignore_eos else tokenizer.eos_token_id
    out = generate_batch(model, prompts, args.mode, args.max_new_tokens, eos_id=eos, draft_len=draft_len,
                         sampling=sampling, draft_vocab=load_draft_vocab(args, model),
                         max_auto_draft_len=args.max_draft_len, draft_width=args.draft_width, lookup=args.lookup)
    if not tp_loading.is_rank0():
        return 0
    blocks = [tokenizer.decode(p + row.tokens, skip_special_tokens=True) for p, row in zip(prompts, out.rows)]
    print("\n\n".join(blocks), file=text_out)
    for row in out.rows:
        print(stats_line(row.stats), file=sys.stderr)
    if len(out.rows) > 1:
        print(f"[batch] {out.new_tokens} tokens in {out.seconds:.2f} s: {out.tokens_per_s:.1f} tokens/s, "
              f"{out.full_forwards} batched full forwards", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
