"""The training objective, in one place for the one-device model and the pipeline's last stage.

    L = L_lm + lambda * sum_j w_j * L_rec^(j)            j = 1 .. train_depth

L_lm is the token-mean cross-entropy of the full model. The module's depth-j state at position i (see
model/recycle.py `RecyclableModule.unroll`) predicts x_{i+j+1}; its loss L_rec^(j) is, per position,

    target=tokens   CE(module, x_{i+j+1})                                  (the corpus token; the paper)
    target=base     KL(p_base(. | x_0..x_{i+j}) || q_module)             (the full model's own distribution
                    at position i+j, i.e. what `verify` accepts; the teacher is detached)
    target=mix      (1 - mix) * tokens + mix * base

as a token mean over the positions whose target token is not masked. With a draft vocabulary
(recycle.draft_vocab: the V' most frequent training tokens, model/draft_vocab.py) the module's logits are
W_out's V' rows only, the teacher is the base's distribution renormalised over those V' tokens, and a corpus
token outside them is masked out of the CE: the module learns exactly the choice it drafts over, for a head
V/V' times cheaper (the module's LM head is most of its training cost on a small model). Depth 1 (the default)
is the paper's module: L_rec^(1) is logged as `recycle_loss`, deeper ones as `recycle_loss_d2`, `recycle_loss_d3`, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

TARGETS = ("tokens", "base", "mix")


class LossOutput(NamedTuple):
    loss: torch.Tensor
    lm_loss: torch.Tensor
    recycle_loss: torch.Tensor | None                   # depth 1
    deeper_losses: tuple = ()                           # depths 2 .. train_depth

    def named(self) -> dict[str, torch.Tensor | None]:
        """The logged scalars by their metrics.jsonl names."""
        out = {"loss": self.loss, "lm_loss": self.lm_loss, "recycle_loss": self.recycle_loss}
        out.update((f"recycle_loss_d{j}", t) for j, t in enumerate(self.deeper_losses, 2))
        return out

    def vector(self) -> torch.Tensor:
        """(loss, lm, recycle or 0, deeper...) as one fp32 vector, for averaging over micro-batches and dp."""
        rec = self.recycle_loss if self.recycle_loss is not None else self.loss * 0
        return torch.stack([t.detach().float().reshape(()) for t in (self.loss, self.lm_loss, rec,
                                                                       *self.deeper_losses)])

    @classmethod
    def from_vector(cls, vec: torch.Tensor, has_recycle: bool) -> "LossOutput":
        return cls(vec[0], vec[1], vec[2] if has_recycle else None, tuple(vec[3:]))


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class RecycleObjective:
    weight: float = 1.0                  # lambda
    target: str = "tokens"               # tokens | base | mix
    mix: float = 0.5                     # share of the base-distribution term under target=mix
    depth: int = 1                       # recycle.train_depth
    depth_weights: tuple = field(default=())   # w_1 .. w_depth; empty = all 1.0
    draft_ids: torch.Tensor | None = field(default=None, compare=False, repr=False)   # recycle.draft_vocab rows

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"recycle.target={self.target!r}; valid: {', '.join(TARGETS)}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"recycle.mix={self.mix} must be between 0 and 1")
        if self.depth < 1:
            raise ValueError(f"recycle.train_depth={self.depth} must be >= 1 (1 = the paper's module)")
        if self.depth_weights and len(self.depth_weights) != self.depth:
            raise ValueError(f"recycle.depth_weights has {len(self.depth_weights)} entries; recycle.train_depth="
                             f"{self.depth} needs {self.depth} (or none for all 1.0)")
        if any(w < 0 for w in self.depth_weights):
            raise ValueError(f"recycle.depth_weights={list(self.depth_weights)} must not be negative")

    @property
    def weights(self) -> tuple:
        return tuple(self.depth_weights) or (1.0,) * self.depth

    @property
    def base_share(self) -> float:
        return {"tokens": 0.0, "base": 1.0, "mix": self.mix}[self.target]

    def module_logits(self, lm_head, g: torch.Tensor) -> torch.Tensor:
        """The module's training logits: over the whole vocabulary, or over the draft vocabulary's rows of W_out."""
        if self.draft_ids is None:
            return lm_head(g)
        return F.linear(g, lm_head.weight[self.draft_ids.to(lm_head.weight.device)])

    def _in_draft_vocab(self, target: torch.Tensor, mask):
        """Corpus tokens as draft-vocabulary positions, and the mask without the tokens outside it."""
        ids = self.draft_ids.to(target.device)
        local = torch.full((int(max(ids.max(), target.max())) + 1,), -1, dtype=torch.long, device=target.device)
        local[ids] = torch.arange(ids.numel(), device=target.device)
        local = local[target]
        inside = local >= 0
        return local.clamp(min=0), inside if mask is None else inside & mask.bool()

    def __call__(self, spec, lm_logits, rec_logits: list, labels, loss_mask, teacher_only: bool = False) -> LossOutput:
        """lm_logits [B, T, V/tp]; rec_logits[j-1] [B, T-j, V/tp], the depth-j states' logits (positions
        0 .. T-j-1); labels[i] = x_{i+1}. Under TP the cross-entropy works in place on fp32 logits, so every
        other use of a logits tensor (the base's distribution, the KL) comes before its cross-entropy.

        teacher_only (a frozen base's training step, model/frozen_base.py): lm_logits are the base's logits over
        the rows `module_logits` covers only (None when the target needs no teacher), and the base's own loss is
        not computed: lm_loss is NaN and the total is the module's weighted loss alone (the gradient is the same)."""
        if len(rec_logits) not in (0, self.depth):
            raise ValueError(f"got {len(rec_logits)} depths of module logits for train_depth={self.depth}")
        share = self.base_share
        rec_losses = []
        for j, logits in enumerate(rec_logits, 1):
            # depth j at position i targets labels[i + j] = x_{i+j+1}; the base predicts it at position i + j.
            target, mask = labels[:, j:], None if loss_mask is None else loss_mask[:, j:]
            teacher = None if lm_logits is None else lm_logits[:, j:]
            if self.draft_ids is not None:
                if not teacher_only:
                    teacher = teacher[..., self.draft_ids.to(teacher.device)]
                if share < 1:
                    target, mask = self._in_draft_vocab(target, mask)
            per_token = 0.0
            if share > 0:
                per_token = share * spec.kl_to_teacher(logits, teacher)
            if share < 1:
                per_token = per_token + (1 - share) * spec.cross_entropy(logits, target)
            rec_losses.append(masked_mean(per_token, mask))
        module_loss = self.weight * sum(w * r for w, r in zip(self.weights, rec_losses)) if rec_losses else None
        if teacher_only:
            return LossOutput(module_loss, torch.full_like(module_loss, float("nan")), rec_losses[0],
                              tuple(rec_losses[1:]))
        lm_loss = masked_mean(spec.cross_entropy(lm_logits, labels), loss_mask)
        if not rec_losses:
            return LossOutput(lm_loss, lm_loss, None)
        return LossOutput(lm_loss + module_loss, lm_loss, rec_losses[0], tuple(rec_losses[1:]))
