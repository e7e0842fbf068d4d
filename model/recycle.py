"""The recyclable module (DESIGN.md §1).

At position i it sees the full model's final hidden state h_i and the embedding of the token the full
model just predicted, x_{i+1}, and predicts x_{i+2}:

    u_i = W_proj [ RMSNorm_h(h_i) ; RMSNorm_e(E[x_{i+1}]) ]        (2d -> d, no bias)
    g_i = RMSNorm_r( N causal decoder layers over u_0 .. u_i, rotary position i + 1 )

The embedding E and the LM head W_out belong to the full model and are passed in, not owned here.
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.kv_cache import KVCache
from model.layers import DecoderLayer, RMSNorm, run_stack


class RecyclableModule(nn.Module):
    def __init__(self, cfg: ModelConfig, spec):
        super().__init__()
        d = cfg.hidden_size
        self.hidden_norm = RMSNorm(d, cfg.norm_eps)     # RMSNorm_h
        self.embed_norm = RMSNorm(d, cfg.norm_eps)      # RMSNorm_e
        self.linear_in = spec.replicated_linear(2 * d, d)  # W_proj
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec) for _ in range(cfg.recycle_layers))
        self.final_norm = RMSNorm(d, cfg.norm_eps)      # RMSNorm_r
        self.activation_checkpointing = False

    def forward(self, h: torch.Tensor, next_embeds: torch.Tensor, rotary, start_pos: int | list[int] = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        """h, next_embeds: [B, T, d] for positions start_pos .. start_pos+T-1; returns g (same shape)."""
        T = h.shape[1]
        u = self.linear_in(torch.cat([self.hidden_norm(h), self.embed_norm(next_embeds)], dim=-1))
        # The module's state at position i stands for token i+1, hence rotary position i + 1.
        cos, sin = rotary(start_pos + 1 if isinstance(start_pos, int) else [p + 1 for p in start_pos], T)
        u = run_stack(self.layers, u, cos, sin, cache, self.activation_checkpointing)
        return self.final_norm(u)
