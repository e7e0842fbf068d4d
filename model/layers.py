"""LLaMA-style building blocks: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.

Names follow megatron-core (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`) so checkpoint key
maps stay trivial. Every layer is built through a spec (model/spec.py); under tensor parallelism a rank
holds `num_heads / tp` query heads and `num_kv_heads / tp` key/value heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back, as LLaMA does, so bf16 training matches the reference numerics.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ("none",)) -> torch.Tensor:
    """Rotary frequencies theta^(-2j/d), j < d/2, in float64, with the scaling of long-context models:

    - linear (position interpolation): every frequency divided by `factor`.
    - llama3: wavelengths longer than original_max / low_freq_factor are slowed by `factor`, those shorter than
      original_max / high_freq_factor are kept, and the band between blends the two linearly in
      original_max / wavelength (Llama 3.1's published rule).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling[0]
    if kind == "none":
        return inv_freq
    factor = scaling[1]
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high, original = scaling[2], scaling[3], scaling[4]
        periods_in_context = original * inv_freq / (2 * torch.pi)      # original_max / wavelength
        blend = ((periods_in_context - low) / (high - low)).clamp(0.0, 1.0)   # 0: slow band, 1: fast band
        return inv_freq / factor * (1 - blend) + inv_freq * blend
    raise ValueError(f"rope scaling {kind!r} is not implemented; valid: none, linear, llama3")


class Rotary(nn.Module):
    """cos/sin tables for rotate-half rotary embeddings (the HF LLaMA convention, so weights map 1:1)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: tuple = ("none",)):
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self._build(None)

    def _build(self, device):
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` would round the tables and shift far positions; keep them in fp32.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self._build(self.cos.device)
        return self

    def _check(self, last: int):
        if last >= self.max_positions:
            raise ValueError(f"position {last} exceeds the rotary table ({self.max_positions} "
                             "positions); raise model.max_seq_len")

    def forward(self, start: int | list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start .. start+length-1: [length, hd], or [B, 1, length, hd] when `start`
        is one int per batch row (rows of a ragged cache). Plain ints: no device sync while decoding."""
        self._check((start if isinstance(start, int) else max(start)) + length - 1)
        if isinstance(start, int):
            return self.cos[start:start + length], self.sin[start:start + length]
        index = torch.tensor(start, device=self.cos.device)[:, None] + torch.arange(length, device=self.cos.device)
        return self.cos[index].unsqueeze(1), self.sin[index].unsqueeze(1)

    def at(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [T, hd] for arbitrary positions, one per new token (a token tree: siblings share one)."""
        self._check(max(positions))
        index = torch.tensor(positions, device=self.cos.device)
        return self.cos[index], self.sin[index]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, hd]; cos/sin: [T, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec):
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.local_heads = cfg.num_heads // spec.tp_size
        self.local_kv_heads = cfg.num_kv_heads // spec.tp_size
        q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.linear_qkv = spec.column_linear(cfg.hidden_size, q + 2 * kv, fused_sizes=(q, kv, kv))
        self.linear_proj = spec.row_linear(q, cfg.hidden_size)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer_idx: int = 0):
        B, T, _ = x.shape
        hd = self.head_dim
        qkv = self.linear_qkv(x)
        q, k, v = qkv.split([self.local_heads * hd, self.local_kv_heads * hd, self.local_kv_heads * hd], -1)
        q = apply_rotary(q.view(B, T, -1, hd).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(B, T, -1, hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        past, ragged_mask = 0, None
        if cache is not None:
            past, ragged_mask = cache.positions, cache.attention_mask(T)
            k, v = cache.write(layer_idx, k, v)
        gqa = self.local_heads != self.local_kv_heads
        if ragged_mask is not None:     # batch rows at different lengths: each sees its own prefix only
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ragged_mask, enable_gqa=gqa)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif T == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # New query j sits at absolute position past + j and sees every key up to it.
            keep = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)
        return self.linear_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, spec):
        super().__init__()
        f = cfg.ffn_hidden_size
        self.local_ffn = f // spec.tp_size
        # One matmul for gate and up; under TP each rank holds [gate_r; up_r] so the split below stays local.
        self.linear_fc1 = spec.column_linear(cfg.hidden_size, 2 * f, fused_sizes=(f, f))
        self.linear_fc2 = spec.row_linear(f, cfg.hidden_size)

    def forward(self, x):
        gate, up = self.linear_fc1(x).split(self.local_ffn, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attention = Attention(cfg, spec)
        self.pre_mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg, spec)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer_idx: int = 0):
        x = x + self.self_attention(self.input_norm(x), cos, sin, cache, layer_idx)
        return x + self.mlp(self.pre_mlp_norm(x))


def run_stack(layers: nn.ModuleList, x, cos, sin, cache: KVCache | None, checkpointing: bool):
    """Run a stack of decoder layers. With a cache, all layers write the new positions, then the cache
    advances once; in training, activation checkpointing recomputes each layer in the backward pass."""
    for idx, layer in enumerate(layers):
        if checkpointing and layer.training and cache is None:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False)
        else:
            x = layer(x, cos, sin, cache, idx)
    if cache is not None:
        cache.advance(x.shape[1])
    return x
