"""The layer factory the model is built through.

The model never constructs a Linear or Embedding directly; it asks a spec. `LocalSpec` gives plain torch
layers for one device with no process group (tests, conversion, laptop inference). `parallel/` provides a
tensor-parallel spec with the same methods, backed by megatron-core layers, so the model math stays here
and the parallel choice is made from outside (DESIGN.md §3).

Conventions every spec keeps:
- `column_linear` splits its output features across tensor-parallel ranks. A fused weight (qkv, gate+up)
  passes `fused_sizes`: each block is split separately, so a rank holds [Q_r; K_r; V_r].
- `row_linear` splits its input features and returns the full, reduced output.
- `lm_head` returns logits over this rank's vocabulary shard; `cross_entropy` and `kl_to_teacher` take them
  as they are and `gather_vocab` assembles full-vocabulary logits for decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LocalSpec:
    tp_size = 1
    tp_rank = 0

    def column_linear(self, in_features: int, out_features: int, fused_sizes=None) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def row_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def replicated_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab_size, dim)

    def lm_head(self, dim: int, vocab_size: int) -> nn.Module:
        return nn.Linear(dim, vocab_size, bias=False)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token loss, no reduction; fp32 for a stable softmax over a large vocabulary."""
        return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none").view_as(target)

    def kl_to_teacher(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Per-token KL(softmax(teacher) || softmax(logits)), no reduction, fp32; no gradient to the teacher."""
        log_q = F.log_softmax(logits.float(), dim=-1)
        log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
