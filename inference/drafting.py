"""`verify`: the module drafts k tokens, one full forward checks them all (lossless; DESIGN.md §2).

The module's draft depths follow model/recycle.py (the convention the unrolled training objective uses):

    g^(1)_i = M(h_i, E[x_{i+1}])              predicts x_{i+2}
    g^(j)_i = M(g^(j-1)_i, E[x_{i+j}])        predicts x_{i+j+1}      (`model.draft_step`)

and each depth is its own causal sequence with its own KV cache: g^(j)_i attends to the depth-j states of
positions 0 .. i. Depth j at position i needs x_{i+j}, so with verified text x_0 .. x_n the depth-j cache
holds positions 0 .. n-j (from verified tokens only).

One cycle, for a row whose base cache holds x_0 .. x_{n-1}, with `last` = x_n (emitted, not yet seen by the
full model):

1. Draft. d_1 = choice(W_out g^(1)_{n-1}). For j = 2 .. k, depth j runs on its positions n-j+1 .. n-1 (the
   ones whose token x_{i+j} is a draft), from the depth j-1 states there and tokens d_1 .. d_{j-1}, and
   d_j = choice(W_out g^(j)_{n-1}). These draft positions are appended to the depth caches.
2. Verify. The full model runs once on [x_n, d_1 .. d_k] at positions n .. n+k: h_{n+j} gives the full
   model's own distribution for x_{n+j+1}. `Sampler.accept` takes the longest accepted prefix d_1 .. d_a
   (greedy: equal to the full model's argmax; sampling: the speculative rule) and the full model's token t
   after it. Emitted: d_1 .. d_a, t (fewer when the budget ends or EOS comes first).
3. Roll back and refresh. The base cache keeps x_n, d_1 .. d_a and forgets the k - a rejected slots; every
   depth cache forgets its draft positions. Then, with the verified text now x_0 .. x_{n+a+1}, each depth
   j = 1 .. K runs once on its newly verified positions (n-j+1 .. n+a+1-j), depth 1 from the true h.

So every depth cache holds exactly what a cache-free unroll over the verified text gives, and the drafts are
what a cache-free unroll over verified text + drafts gives (tests/test_inference_drafts.py checks both
through the emitted tokens and acceptance counts). Every emitted token is the full model's choice (greedy) or
distributed as the full model's (sampling) given a correct prefix. k = 1 is the original verify: depth 1
only, run on one or two positions per cycle.

Near the end, k shrinks so that no row drafts past its token budget (max_new_tokens caps the positions).
In a batch each row accepts its own a; the rows' caches then differ in length (model/kv_cache.py), every
module run covers the longest row's positions and each row rolls back what it does not need.
"""
from __future__ import annotations

import torch

from inference.rows import Rows, module_choice, prefill
from model.kv_cache import KVCache


class DraftDepths:
    """The module's states at depths 1 .. K: one KV cache per depth, and per depth the output states by
    absolute position (`states[0]` holds the full model's h, the input of depth 1)."""

    def __init__(self, model, rows: Rows, module_cache: KVCache, depths: int, h_len: int):
        self.model, self.rows, self.depths = model, rows, depths
        k0 = module_cache.keys[0]
        self.caches = [module_cache] + [
            KVCache(len(module_cache.keys), k0.shape[0], k0.shape[1], module_cache.max_len, k0.shape[3], k0.dtype,
                    k0.device) for _ in range(depths - 1)]
        B, d = len(rows), model.cfg.hidden_size
        length = module_cache.max_len + depths + 2          # room for the padded positions of ragged rows
        self.states = [torch.zeros(B, length, d, dtype=k0.dtype, device=k0.device) for _ in range(depths + 1)]
        self.rows_index = torch.arange(B, device=k0.device)[:, None]

    def cache(self, depth: int) -> KVCache:
        return self.caches[depth - 1]

    def store_h(self, h: torch.Tensor, starts: list[int]):
        """Full-model states h [B, T, d] of positions starts[b] .. starts[b]+T-1."""
        positions = torch.tensor(starts, device=h.device)[:, None] + torch.arange(h.shape[1], device=h.device)
        self.states[0][self.rows_index, positions] = h

    def run(self, depth: int, counts: list[int], texts: list[list[int]]):
        """Depth `depth` on the next counts[b] positions of row b (from its cache length on), with tokens
        texts[b][i + depth] at position i; appends them to the depth's cache and stores the states."""
        width = max(counts)
        if width == 0:
            return
        cache = self.cache(depth)
        starts = list(cache.lengths)
        positions = torch.tensor(starts, device=self.rows_index.device)[:, None] + \
            torch.arange(width, device=self.rows_index.device)
        tokens = [[texts[b][s + i + depth] if i < counts[b] else 0 for i in range(width)]
                  for b, s in enumerate(starts)]
        inputs = self.states[depth - 1][self.rows_index, positions]
        g = self.model.draft_step(inputs, self.rows.tensor(tokens), cache)
        cache.rollback([width - c for c in counts])
        self.states[depth][self.rows_index, positions] = g     # padded positions: scratch, rewritten later
        self.rows.count_module_forward()

    def state_at(self, depth: int, positions: list[int]) -> torch.Tensor:
        return self.states[depth][self.rows_index[:, 0], torch.tensor(positions, device=self.rows_index.device)]

    def catch_up(self, texts: list[list[int]], live: list[bool]):
        """Every depth over its newly verified positions: depth j holds 0 .. len(text)-1-j afterwards."""
        for depth in range(1, self.depths + 1):
            cache = self.cache(depth)
            counts = [max(0, len(t) - depth) - n if ok else 0 for t, n, ok in zip(texts, cache.lengths, live)]
            self.run(depth, counts, texts)


def decode_verify(model, rows: Rows, caches, policy, draft_vocab, start: float) -> int:
    """`policy` (inference/draft_policy.py) says how many tokens to draft in each cycle."""
    base_cache, module_cache = caches
    h, last = prefill(model, rows, base_cache, start)
    forwards = 1
    if rows.all_done:
        return forwards
    B = len(rows)
    max_k = policy.max_k if hasattr(policy, "max_k") else policy.k
    depths = DraftDepths(model, rows, module_cache, max_k, base_cache.max_len)
    depths.store_h(h, [0] * B)
    depths.catch_up(verified_texts(rows), [True] * B)
    while not rows.all_done:
        active = rows.active
        was_active = set(active)
        texts = verified_texts(rows)
        n = [len(t) - 1 for t in texts]                            # position of `last` per row
        # Never draft past a row's budget (positions past max_seq_len have no rotary table).
        k = min([policy.next_k()] + [rows.remaining(b) for b in active])
        before = [list(depths.cache(j).lengths) for j in range(1, k + 1)]
        drafts, draft_probs = draft_tokens(model, rows, depths, texts, n, k, draft_vocab, was_active)
        h = model.base_step(torch.cat([rows.tensor([[t[-1]] for t in texts]), drafts], dim=1), base_cache)
        rows.count_full_forward()
        forwards += 1
        accepted, nxt = rows.sampler.accept(drafts, draft_probs, model.logits(h))
        drafted = drafts.tolist()
        policy.record(k, [accepted[b] for b in active])
        for b in active:
            rows.stats[b].proposed += k
            rows.stats[b].accepted += accepted[b]
            for token in drafted[b][:accepted[b]] + [nxt[b]]:
                if rows.emit(b, token):
                    break
        # Rows finished before this cycle keep nothing of it; the others keep x_n and their accepted drafts.
        keep = [accepted[b] + 1 if b in was_active else 0 for b in range(B)]
        base_cache.rollback([k + 1 - n for n in keep])
        for j, lengths in enumerate(before, start=1):              # the draft positions of every depth
            depths.cache(j).rollback([now - then for now, then in zip(depths.cache(j).lengths, lengths)])
        if rows.all_done:
            break
        depths.store_h(h, n)
        depths.catch_up(verified_texts(rows), [not done for done in rows.done])
    return forwards


def verified_texts(rows: Rows) -> list[list[int]]:
    return [p + t for p, t in zip(rows.prompts, rows.tokens)]


def draft_tokens(model, rows: Rows, depths: DraftDepths, texts, n: list[int], k: int, draft_vocab, live: set):
    """k drafted tokens per row: (drafts [B, k], q [B, k, V] or None when greedy). Finished rows (not in
    `live`) run no positions; their drafts are scratch."""
    extended = [list(t) for t in texts]
    tokens, probs = [], []
    for depth in range(1, k + 1):
        if depth > 1:      # depth j on positions n-j+1 .. n-1, whose tokens x_{i+j} are this cycle's drafts
            cache = depths.cache(depth)
            depths.run(depth, [nb - length if b in live else 0 for b, (nb, length) in enumerate(zip(n, cache.lengths))],
                       extended)
        token, q = module_choice(model, rows, depths.state_at(depth, [nb - 1 for nb in n]), draft_vocab)
        tokens.append(token)
        probs.append(q)
        for row, t in zip(extended, token.tolist()):
            row.append(t)
    drafts = torch.stack(tokens, dim=1)
    return drafts, (None if probs[0] is None else torch.stack(probs, dim=1))
