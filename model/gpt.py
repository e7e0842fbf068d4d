"""RecycleGPT: a LLaMA-style decoder plus the recyclable module, readable top to bottom.

    tokens -> E -> N_base decoder layers -> final RMSNorm -> h -> W_out -> logits (predict x_{i+1})
    (h_i, E[x_{i+1}]) -> recyclable module -> g_i -> W_out -> logits (predict x_{i+2})

Training loss: L = L_lm + lambda * L_rec, both token means. Decoding uses `base_step` / `module_step`
with one KV cache each (inference/ alternates them).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from model.config import ModelConfig
from model.kv_cache import KVCache
from model.layers import DecoderLayer, RMSNorm, Rotary, run_stack
from model.recycle import RecyclableModule
from model.spec import LocalSpec


class LossOutput(NamedTuple):
    loss: torch.Tensor
    lm_loss: torch.Tensor
    recycle_loss: torch.Tensor | None


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def recycle_objective(spec, lm_logits, rec_logits, labels, loss_mask, recycle_weight: float) -> LossOutput:
    """L_lm over every position; L_rec at position i targets labels[i+1] = x_{i+2}, so the last drops out.

    Shared by the one-device model and the pipeline's last stage so both compute the same numbers.
    """
    lm_loss = masked_mean(spec.cross_entropy(lm_logits, labels), loss_mask)
    if rec_logits is None:
        return LossOutput(lm_loss, lm_loss, None)
    rec_tokens = spec.cross_entropy(rec_logits[:, :-1], labels[:, 1:])
    rec_loss = masked_mean(rec_tokens, None if loss_mask is None else loss_mask[:, 1:])
    return LossOutput(lm_loss + recycle_weight * rec_loss, lm_loss, rec_loss)


@torch.no_grad()
def init_parameter(cfg: ModelConfig, name: str, p: torch.Tensor, generator: torch.Generator | None = None):
    """Normal(0, std) everywhere; output projections scaled by 1/sqrt(2 * depth) as in GPT-2.

    One parameter at a time, by its full name, so parallel/ can reproduce the one-device initialisation
    parameter by parameter (and shard it) without materialising a 7B model.
    """
    std = cfg.init_std
    depth = cfg.num_layers + cfg.recycle_layers
    if name.endswith("norm.weight"):
        p.fill_(1.0)
    elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        p.normal_(0.0, std / (2 * depth) ** 0.5, generator=generator)
    else:
        p.normal_(0.0, std, generator=generator)


class RecycleGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, spec=None):
        super().__init__()
        spec = spec or LocalSpec()
        self.cfg, self.spec = cfg, spec
        self.embedding = spec.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = spec.lm_head(cfg.hidden_size, cfg.vocab_size)
        self.recycle = RecyclableModule(cfg, spec) if cfg.recycle_layers else None
        # +2: the module looks one position ahead, and verify mode feeds two tokens past the last one.
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len + 2, cfg.rope_theta, cfg.rope_scaling_args)
        self.recycle_weight = 1.0       # lambda
        self.detach_base = False        # True: L_rec trains the module only (frozen or imported base)
        self.activation_checkpointing = False
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        for name, p in self.named_parameters():
            init_parameter(self.cfg, name, p, generator)

    # ---------------------------------------------------------------------------------- the network
    def hidden(self, input_ids: torch.Tensor, start_pos: int | list[int] = 0, cache: KVCache | None = None):
        """The full model's final hidden state h (after the final norm) for the given tokens."""
        x = self.embedding(input_ids)
        T = input_ids.shape[1]
        cos, sin = self.rotary(start_pos, T)
        x = run_stack(self.layers, x, cos, sin, cache, self.activation_checkpointing)
        return self.final_norm(x)

    def recycle_hidden(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int | list[int] = 0,
                       cache: KVCache | None = None):
        """g: the module's state for positions start_pos.., given h there and the tokens that follow."""
        if self.recycle is None:
            raise ValueError("this model has no recyclable module (model.recycle_layers = 0)")
        return self.recycle(h, self.embedding(next_ids), self.rotary, start_pos, cache)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """Training loss. labels[i] = x_{i+1}; the module at i reads E[labels[i]] and targets labels[i+1]."""
        self.recycle_activation_checkpointing()
        h = self.hidden(input_ids)
        lm_logits = self.lm_head(h)
        rec_logits = None
        if self.recycle is not None:
            g = self.recycle_hidden(h.detach() if self.detach_base else h, labels)
            rec_logits = self.lm_head(g)
        return recycle_objective(self.spec, lm_logits, rec_logits, labels, loss_mask, self.recycle_weight)

    def recycle_activation_checkpointing(self):
        if self.recycle is not None:
            self.recycle.activation_checkpointing = self.activation_checkpointing

    def freeze_base(self):
        """Only the module trains: the base (embedding, layers, final norm, LM head) stops receiving updates."""
        self.detach_base = True
        for name, p in self.named_parameters():
            if not name.startswith("recycle."):
                p.requires_grad_(False)

    # -------------------------------------------------------------------------------------- decoding
    def new_caches(self, batch: int, max_len: int, dtype=None, device=None) -> tuple[KVCache, KVCache | None]:
        """One KV cache for the full model, one for the module (None for a plain LM)."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        kv = self.cfg.num_kv_heads // self.spec.tp_size
        base = KVCache(self.cfg.num_layers, batch, kv, max_len, self.cfg.head_dim, dtype, device)
        module = None
        if self.recycle is not None:
            module = KVCache(self.cfg.recycle_layers, batch, kv, max_len, self.cfg.head_dim, dtype, device)
        return base, module

    def base_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.hidden(input_ids, cache.positions, cache)

    def module_step(self, h: torch.Tensor, next_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.recycle_hidden(h, next_ids, cache.positions, cache)

    def draft_step(self, state: torch.Tensor, next_ids: torch.Tensor, cache: KVCache | None = None,
                   start_pos: int | None = None) -> torch.Tensor:
        """One depth of the module: `state` is h (depth 1) or the previous depth's g, `next_ids` the tokens
        that follow (x_{i+j} at depth j); returns the next depth's g. With a cache (one per depth), positions
        start at cache.length. Training (`forward` via RecyclableModule.unroll) runs the same step; decoding
        (inference/drafting.py) keeps one cache per depth. The convention is spelled out in model/recycle.py."""
        if start_pos is None:
            start_pos = cache.positions if cache is not None else 0
        return self.recycle_hidden(state, next_ids, start_pos, cache)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits for h or g (gathered across tensor-parallel ranks)."""
        return self.spec.gather_vocab(self.lm_head(states))
