"""An optional draft vocabulary: the module's logits over the V' most frequent tokens only.

On small models the module's LM head (d x V) is a large part of its cost. Drafting over the V' most frequent
tokens of the training data (EAGLE-3, FR-Spec) cuts that to d x V'; a token outside them can no longer be
drafted, which costs some acceptance but never correctness: the full model still verifies every draft over
the whole vocabulary.

The mapping is one safetensors file (`draft_vocab.safetensors`, tensor `token_ids`, most frequent first),
kept next to the model. Compute it from tokenized shards (data_prep.tokenize's `.bin/.idx` prefixes):

    python -m inference.draft_vocab --data data/sotu --size 4096 --output RUN_DIR/draft_vocab.safetensors
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from inference.weight_layout import like

FILE_NAME = "draft_vocab.safetensors"


class DraftVocab:
    def __init__(self, token_ids: torch.Tensor):
        self.token_ids = token_ids.long()
        self._weights: dict = {}

    def __len__(self) -> int:
        return self.token_ids.numel()

    # ------------------------------------------------------------------------------------------ decoding
    def to(self, device) -> "DraftVocab":
        self.token_ids = self.token_ids.to(device)
        return self

    def check(self, vocab_size: int):
        if len(self) == 0 or int(self.token_ids.max()) >= vocab_size or int(self.token_ids.min()) < 0:
            raise ValueError(f"draft vocabulary of {len(self)} ids does not fit the model's {vocab_size}-token "
                             "vocabulary; compute it from data tokenized with the model's tokenizer")

    def logits(self, model, states: torch.Tensor) -> torch.Tensor:
        """Logits [..., V'] of the module's states over the draft vocabulary only."""
        if model.spec.tp_size > 1:      # the head is split over the vocabulary: gather, then pick (no saving)
            return model.logits(states)[..., self.token_ids]
        weight = model.lm_head.weight
        key = (weight.data_ptr(), weight.dtype, weight.device)
        if key not in self._weights:    # the V' rows of W_out, copied once per model, in W_out's layout
            self._weights = {key: like(weight.detach()[self.token_ids], weight)}
        return torch.nn.functional.linear(states, self._weights[key])

    def to_full(self, local_ids: torch.Tensor) -> torch.Tensor:
        return self.token_ids[local_ids]

    def scatter(self, local_probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """A distribution over the draft vocabulary [..., V'] as one over the full vocabulary [..., V]."""
        full = local_probs.new_zeros(*local_probs.shape[:-1], vocab_size)
        return full.index_copy_(-1, self.token_ids, local_probs)

    # ----------------------------------------------------------------------------------------- files
    def save(self, path):
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"token_ids": self.token_ids.cpu().contiguous()}, str(tmp), metadata={"size": str(len(self))})
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "DraftVocab":
        from safetensors.torch import load_file

        try:
            return cls(load_file(str(path))["token_ids"])
        except (OSError, KeyError, Exception) as err:  # safetensors raises its own error types
            raise ValueError(f"could not read a draft vocabulary from {path}: {err}; "
                             "write one with python -m inference.draft_vocab") from None

    @classmethod
    def from_counts(cls, counts: torch.Tensor, size: int) -> "DraftVocab":
        """The `size` most frequent token ids (ties: lower id first)."""
        order = torch.sort(counts.double(), descending=True, stable=True).indices
        return cls(order[:size].clone())


def load_draft_vocab(args, model) -> DraftVocab | None:
    """The --draft-vocab file of inference.generate / inference.benchmark for this model, or None."""
    from data_prep.cli import UsageError

    if not args.draft_vocab:
        return None
    try:
        vocab = DraftVocab.load(args.draft_vocab)
        vocab.check(model.cfg.vocab_size)
    except ValueError as err:
        raise UsageError(f"--draft-vocab: {err}") from None
    return vocab


def count_tokens(prefixes: list[str], vocab_size: int | None = None, progress=None) -> torch.Tensor:
    """Token counts over megatron-core indexed datasets (`PREFIX.bin` / `PREFIX.idx`)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = np.zeros(vocab_size or 1, dtype=np.int64)
    for prefix in prefixes:
        data = IndexedDataset(prefix)
        for i in range(len(data)):
            c = np.bincount(np.asarray(data[i], dtype=np.int64))
            if c.size > counts.size:
                counts = np.pad(counts, (0, c.size - counts.size))
            counts[:c.size] += c
            if progress is not None:
                progress(i + 1, len(data), prefix)
    return torch.from_numpy(counts)


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
