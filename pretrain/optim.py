"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Norm gains and other vectors are not decayed (GPT-2 / LLaMA practice); embeddings and matrices are.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that leaves parameters and moments untouched when any rank holds a non-finite gradient.

    DeepSpeed calls `step` on every rank at the same point (also under ZeRO, on each rank's partition), so the
    all-reduced flag keeps replicas identical. The trainer logs the skipped step from the non-finite loss.

    When the engine has just clipped the gradients it hands over that norm (`clip_norm`, already reduced over
    every rank: pretrain.runtime), and no second pass over the gradients is needed; otherwise (ZeRO and bf16
    wrappers, no clipping) the check computes and all-reduces its own.
    """

    skipped_steps = 0
    clip_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        total, self.clip_norm = self.clip_norm, None
        if total is None:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            total = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros(())
            if dist.is_available() and dist.is_initialized():
                total = total.to(torch.float32).reshape(1)
                dist.all_reduce(total)   # a NaN or inf anywhere makes the sum non-finite everywhere
        if not torch.isfinite(total).all():
            self.skipped_steps += 1
            return None
        return super().step(closure)


def make_optimizer(model: torch.nn.Module, train) -> torch.optim.Optimizer:
    on_gpu = next(model.parameters()).is_cuda
    return SkipNonFiniteAdamW(param_groups(model, train.weight_decay), lr=train.lr,
                             betas=(train.beta1, train.beta2), eps=1e-8, fused=on_gpu or None)


def lr_factor(step: int, train) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): warmup to 1, cosine to min_lr/lr."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.min_lr / train.lr if train.lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, train):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
