"""The draft vocabulary: the V' token ids the module's head is restricted to (most frequent first).

One safetensors file (`draft_vocab.safetensors`, tensor `token_ids`) next to the model. Training can restrict the
module's loss to it (`recycle.draft_vocab: V'`; pretrain/runtime.py `run_draft_vocab` writes it into the run
directory), and decoding drafts over it (inference/draft_vocab.py: `--draft-vocab`, the CLI that computes one).
Why it exists and what it costs: inference/draft_vocab.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.strides import PACKED, like, linear

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
        head = model.lm_head
        key = (head.weight.data_ptr(), head.weight.dtype, head.weight.device, id(getattr(head, PACKED, None)))
        if key not in self._weights:    # the V' rows of W_out, copied once per model, stored as W_out is
            self._weights = {key: like(head.weight.detach()[self.token_ids], head)}
        return linear(states, *self._weights[key])

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
    def load(cls, path, vocab_size: int | None = None) -> "DraftVocab":
        """The file's draft vocabulary; with `vocab_size`, also checked to fit that model (ValueError)."""
        from safetensors.torch import load_file

        try:
            vocab = cls(load_file(str(path))["token_ids"])
        except (OSError, KeyError, Exception) as err:  # safetensors raises its own error types
            raise ValueError(f"could not read a draft vocabulary from {path}: {err}; "
                             "write one with python -m inference.draft_vocab") from None
        if vocab_size is not None:
            vocab.check(vocab_size)
        return vocab

    @classmethod
    def from_counts(cls, counts: torch.Tensor, size: int) -> "DraftVocab":
        """The `size` most frequent token ids (ties: lower id first)."""
        order = torch.sort(counts.double(), descending=True, stable=True).indices
        return cls(order[:size].clone())
