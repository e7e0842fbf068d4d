"""An optional draft vocabulary: the module's logits over the V' most frequent tokens only.

On small models the module's LM head (d x V) is a large part of its cost. Drafting over the V' most frequent
tokens of the training data (EAGLE-3, FR-Spec) cuts that to d x V'; a token outside them can no longer be
drafted, which costs some acceptance but never correctness: the full model still verifies every draft over
the whole vocabulary.

The mapping is one safetensors file (`draft_vocab.safetensors`, tensor `token_ids`, most frequent first),
kept next to the model. Compute it from tokenized shards (data_prep.tokenize's `.bin/.idx` prefixes):

    python -m inference.draft_vocab --data data/sotu --size 4096 --output RUN_DIR/draft_vocab.safetensors

A module trained with `recycle.draft_vocab: V'` (pretrain/runtime.py writes the file into its run directory)
learned logits over those V' tokens only, so inference.generate / benchmark / evaluate and the lm-eval model
draft over MODEL_DIR/draft_vocab.safetensors whenever the model directory has one (`--draft-vocab none`: the
whole vocabulary; inference/cli.py `resolve_draft_vocab`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from data_prep.token_counts import count_tokens
from model.draft_vocab import FILE_NAME, DraftVocab


def load_draft_vocab(args, model) -> DraftVocab | None:
    """The --draft-vocab file of inference.generate / inference.benchmark for this model, or None."""
    from data_prep.cli import UsageError

    if not args.draft_vocab:
        return None
    try:
        return DraftVocab.load(args.draft_vocab, model.cfg.vocab_size)
    except ValueError as err:
        raise UsageError(f"--draft-vocab: {err}") from None


def main(argv=None) -> int:
    from data_prep.cli import OneLineArgumentParser, UsageError
    from inference.cli import run_main

    def _main(argv):
        p = OneLineArgumentParser(prog="python -m inference.draft_vocab",
                                  description="the V' most frequent tokens of tokenized shards, for cheaper drafts")
        p.add_argument("--data", nargs="+", required=True, metavar="PREFIX", help="PREFIX.bin / PREFIX.idx shards")
        p.add_argument("--size", type=int, default=4096, help="V' (default 4096)")
        p.add_argument("--output", required=True, metavar="FILE", help=f"e.g. RUN_DIR/{FILE_NAME}")
        args = p.parse_args(argv)
        if args.size < 1:
            raise UsageError(f"--size {args.size} must be >= 1")
        missing = [x for x in args.data if not (Path(x + ".bin").is_file() and Path(x + ".idx").is_file())]
        if missing:
            raise UsageError(f"--data {missing[0]}: no {missing[0]}.bin/.idx; pass prefixes written by "
                             "python -m data_prep.tokenize")
        out = Path(args.output)
        if not out.parent.is_dir():
            raise UsageError(f"--output {out}: the folder {out.parent} does not exist")
        from tqdm import tqdm

        bars = {}

        def progress(i, n, prefix):
            if prefix not in bars:
                bars[prefix] = tqdm(total=n, desc=f"counting {prefix}", unit="doc", file=sys.stderr)
            bars[prefix].update(1)

        counts = count_tokens(args.data, progress=progress)
        for bar in bars.values():
            bar.close()
        seen = int((counts > 0).sum())
        vocab = DraftVocab.from_counts(counts, min(args.size, counts.numel()))
        vocab.save(out)
        covered = float(counts[vocab.token_ids].sum() / counts.sum())
        print(f"wrote {out}: {len(vocab)} token ids ({seen} distinct seen), covering {100 * covered:.1f}% "
              f"of {int(counts.sum())} tokens")
        return 0

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
