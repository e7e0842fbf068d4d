"""The recyclable module (DESIGN.md §1).

At position i it sees the full model's final hidden state h_i and the embedding of the token the full
model just predicted, x_{i+1}, and predicts x_{i+2}:

    u_i = W_proj [ RMSNorm_h(h_i) ; RMSNorm_e(E[x_{i+1}]) ]        (2d -> d, no bias)
    g_i = RMSNorm_r( N causal decoder layers over u_0 .. u_i, rotary position i + 1 )

The embedding E and the LM head W_out belong to the full model and are passed in, not owned here.

Drafting several tokens (recycle.train_depth k, and `verify --draft-len k`) applies the same module to its
own output state. One step of the module is always `forward(state, E[next token])`: `state` is h_i at depth 1
and the previous depth's g at deeper depths, and it goes through RMSNorm_h either way. Depth by depth:

    g^(1)_i   = M(h_i,          E[x_{i+1}])     predicts x_{i+2}
    g^(j+1)_i = M(g^(j)_i,      E[x_{i+j+1}])   predicts x_{i+j+2}

Each depth is its own causal sequence: g^(j)_i attends over the depth-j states of positions 0..i (as
DeepSeek-V3's MTP depths do), rotary position i + 1 at every depth (attention only sees differences). So a
decoder that drafts k tokens keeps one module KV cache per depth; the depth-j cache holds depth-j states of
the positions before i, computed from the committed tokens, or from drafted tokens where those are not
committed yet (the drafts of this cycle, rolled back with them). `unroll` below is the training side.
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

    def unroll(self, h: torch.Tensor, next_embeds: torch.Tensor, rotary, depth: int) -> list[torch.Tensor]:
        """Training: the module's states at depths 1..depth for a whole sequence (one `forward` per depth).

        h, next_embeds: [B, T, d], next_embeds[:, i] = E[x_{i+1}]. Returns [g^(1), .., g^(depth)] with
        g^(j): [B, T-j, d] for positions 0..T-j-1 (the last j positions have no target x_{i+j+1} in the
        sequence, so they are never computed)."""
        T = h.shape[1]
        states, state = [], h[:, :T - 1]
        for j in range(1, depth + 1):
            state = self(state, next_embeds[:, j - 1:T - 1], rotary)
            states.append(state)
            state = state[:, :-1]
        return states


@torch.no_grad()
def init_from_base_layers(state: dict, cfg: ModelConfig) -> dict:
    """recycle.init=base_last_layers, for a new module on a trained base (a one-device state dict -> a new one).

    The module's N decoder layers start as copies of the base's last N layers (module layer j <- base layer
    L-N+j), RMSNorm_r as the base's final norm, and W_proj as the identity on the hidden half [I | W_e]: the
    module starts as "the base's top layers run once more on h", the embedding half keeps its small random
    initialisation so the next token's embedding enters from the first step. RMSNorm_h / RMSNorm_e stay 1."""
    out = dict(state)
    n, L, d = cfg.recycle_layers, cfg.num_layers, cfg.hidden_size
    for j in range(n):
        src, dst = f"layers.{max(L - n + j, 0)}.", f"recycle.layers.{j}."
        for key, value in state.items():
            if key.startswith(src):
                out[dst + key[len(src):]] = value.clone()
    w_proj = state["recycle.linear_in.weight"].clone()
    w_proj[:, :d] = torch.eye(d, dtype=w_proj.dtype)
    out["recycle.linear_in.weight"] = w_proj
    out["recycle.final_norm.weight"] = state["final_norm.weight"].clone()
    return out
