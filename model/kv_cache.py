"""A preallocated key/value cache with rollback, per batch row.

One cache serves one stack of layers (the full model, or the recyclable module). `lengths[b]` counts the
positions row b has written; a forward over M new tokens writes slots [lengths[b], lengths[b] + M) of
row b in every layer, and the caller advances the lengths once after the whole stack ran. `rollback(n)`
forgets the last n slots (of every row, or n[b] of row b): verify mode drops rejected drafts this way, and
rows of a batch accept different numbers of them, so their lengths drift apart ("ragged"). Stale values
beyond a row's length are masked out of attention and overwritten later.

While every row has the same length (always at batch 1) the cache behaves as one contiguous block:
plain slice writes, `length` is that common length, and attention needs no mask.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len, self.device = max_len, device
        self.lengths = [0] * batch
        self.uniform = True
        self.step_mask = None        # [B, 1, M, end] for the next step only, set by GPT.tree_step

    @property
    def length(self) -> int:
        """The common length of all rows (ragged caches have none: use `lengths` / `positions`)."""
        if not self.uniform:
            raise ValueError(f"the cache rows hold different lengths {self.lengths}; use .lengths")
        return self.lengths[0]

    @property
    def positions(self) -> int | list[int]:
        """Where the next token of each row sits: one int while the rows agree, else one per row."""
        return self.lengths[0] if self.uniform else list(self.lengths)

    def _set(self, lengths: list[int]):
        self.lengths = lengths
        self.uniform = all(n == lengths[0] for n in lengths)

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [B, heads, M, hd] for the new positions of one layer; return the keys/values of every
        slot up to the longest row's new end (rows shorter than that mask the rest, see `attention_mask`)."""
        M = k.shape[2]
        end = max(self.lengths) + M
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}; "
                             "raise --max-new-tokens' cache size or shorten the prompt")
        if self.uniform:
            start = self.lengths[0]
            self.keys[layer_idx][:, :, start:end] = k
            self.values[layer_idx][:, :, start:end] = v
        else:
            rows, cols = self._scatter_index(M)
            # [B, L, heads, hd] views, so one advanced-index write puts row b's M slots at its own offset.
            self.keys[layer_idx].transpose(1, 2)[rows, cols] = k.transpose(1, 2)
            self.values[layer_idx].transpose(1, 2)[rows, cols] = v.transpose(1, 2)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def _scatter_index(self, M: int):
        if getattr(self, "_index_for", None) != (tuple(self.lengths), M):
            starts = torch.tensor(self.lengths, device=self.device)
            self._index = (torch.arange(len(self.lengths), device=self.device)[:, None],
                           starts[:, None] + torch.arange(M, device=self.device))
            self._index_for = (tuple(self.lengths), M)
        return self._index

    def attention_mask(self, M: int) -> torch.Tensor | None:
        """The step's own mask (a token tree, `GPT.tree_step`); else `causal_mask(M)` for ragged rows; None when
        the rows agree (plain causal attention)."""
        if self.step_mask is not None:
            return self.step_mask
        return None if self.uniform else self.causal_mask(M)

    def causal_mask(self, M: int) -> torch.Tensor:
        """For M new queries per row (before `advance`): [B, 1, M, end] booleans, True where query j of
        row b (at position lengths[b] + j) may attend (every key up to its own position)."""
        if getattr(self, "_mask_for", None) != (tuple(self.lengths), M):    # built once per step, not per layer
            end = max(self.lengths) + M
            query_pos = torch.tensor(self.lengths, device=self.device)[:, None] + torch.arange(M, device=self.device)
            keys = torch.arange(end, device=self.device)
            self._mask = (keys[None, None, :] <= query_pos[:, :, None])[:, None]    # [B, 1, M, end]
            self._mask_for = (tuple(self.lengths), M)
        return self._mask

    def move_slot(self, source: int, target: int):
        """Copy every layer's key/value slot `source` to `target` (all rows): a token tree keeps its accepted
        branch, which must sit at the slot of its position."""
        if source != target:
            for keys, values in zip(self.keys, self.values):
                keys[:, :, target] = keys[:, :, source]
                values[:, :, target] = values[:, :, source]

    def advance(self, n: int):
        self._set([length + n for length in self.lengths])

    def rollback(self, n: int | list[int]):
        """Forget the last n slots of every row, or n[b] of row b."""
        per_row = [n] * len(self.lengths) if isinstance(n, int) else list(n)
        if len(per_row) != len(self.lengths) or any(r < 0 or r > length for r, length in zip(per_row, self.lengths)):
            raise ValueError(f"cannot roll back {n} of {self.lengths} cached positions")
        self._set([length - r for length, r in zip(self.lengths, per_row)])
