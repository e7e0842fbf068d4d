"""A preallocated key/value cache with rollback.

One cache serves one stack of layers (the full model, or the recyclable module). `length` counts the
positions already written; a forward over M new tokens writes slots [length, length + M) in every layer
and the caller advances `length` once after the whole stack ran. `rollback(n)` forgets the last n slots
(verify mode drops a rejected guess this way); stale values beyond `length` are simply overwritten later.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v for the new positions of one layer; return keys/values for all positions so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}; "
                             "raise --max-new-tokens' cache size or shorten the prompt")
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int):
        self.length += n

    def rollback(self, n: int):
        if n < 0 or n > self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} cached positions")
        self.length -= n
