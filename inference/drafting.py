"""`verify`: the module drafts k tokens, one full forward checks them all (lossless; DESIGN.md §2).

One cycle, for a row whose base cache holds x_0 .. x_{n-1}, with `last` = x_n (emitted, not yet seen by the
full model) and g_{n-1} (the module's newest state from true h, which predicts x_{n+1}):

1. Draft. d_1 = choice(W_out g_{n-1}). Then k-1 times, `model.draft_step` runs the module on its own output
   (g_{n-1} in h_n's slot, d_1 as the next token, at position n; then g_n and d_2 at n+1, ...), and
   d_{j+1} = choice(W_out g_{n+j-1}). The chain writes k-1 slots into the module's cache.
2. Verify. The full model runs once on [x_n, d_1 .. d_k] at positions n .. n+k: h_{n+j} gives the full
   model's own distribution for x_{n+j+1}. `Sampler.accept` takes the longest accepted prefix d_1 .. d_a
   (greedy: equal to the full model's argmax; sampling: the speculative rule) and the full model's token t
   after it. Emitted: d_1 .. d_a, t (fewer when the budget ends or EOS comes first).
3. Roll back. The base cache keeps x_n, d_1 .. d_a (positions n .. n+a) and forgets the k - a rejected
   slots. The module's cache forgets the whole draft chain (its states came from g, not h), and the module
   runs once more on positions n .. n+a with the true h_n .. h_{n+a} and next tokens d_1 .. d_a, t; its
   last state g_{n+a} predicts the token after t and starts the next cycle with last = t.

So the module cache only ever holds states from true h for verified tokens, exactly what a cache-free
computation over the emitted text gives (tests/test_inference_decoding.py checks that). Every emitted token
is the full model's choice (greedy) or distributed as the full model's (sampling) given a correct prefix.
k = 1 is the original verify: no chain, the module runs on one or two positions per cycle.

Near the end, k shrinks so that no row drafts past its token budget (max_new_tokens caps the positions).
In a batch each row accepts its own a; the rows' caches then differ in length (model/kv_cache.py), the
module's refresh runs on max(a)+1 positions and each row rolls back what it does not need.
"""
from __future__ import annotations

import torch

from inference.rows import Rows, module_choice, module_prefill, prefill


def decode_verify(model, rows: Rows, caches, policy, draft_vocab, start: float) -> int:
    """`policy` (inference/draft_policy.py) says how many tokens to draft in each cycle."""
    base_cache, module_cache = caches
    h, last = prefill(model, rows, base_cache, start)
    forwards = 1
    if rows.all_done:
        return forwards
    g = module_prefill(model, rows, h, last, module_cache)          # [B, 1, d], predicts x_{n+1}
    B = len(rows)
    while not rows.all_done:
        active = rows.active
        was_active = set(active)
        # Never draft past a row's budget (positions past max_seq_len have no rotary table).
        k = min([policy.next_k()] + [rows.remaining(b) for b in active])
        drafts, draft_probs = draft_chain(model, rows, g, k, module_cache, draft_vocab)
        h = model.base_step(torch.cat([rows.tensor([[t] for t in last]), drafts], dim=1), base_cache)
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
        module_cache.rollback(max(k - 1, 0))
        if rows.all_done:
            break
        # Refresh the module from true h on the kept positions; row b's next-token column is d_1 .. d_a, t.
        width = max(keep)
        next_ids = [drafted[b][:keep[b] - 1] + [nxt[b]] + [0] * (width - keep[b]) if keep[b]
                    else [0] * width for b in range(B)]
        refreshed = model.module_step(h[:, :width], rows.tensor(next_ids), module_cache)
        rows.count_module_forward()
        module_cache.rollback([width - n for n in keep])
        g = refreshed[torch.arange(B), torch.tensor([max(n - 1, 0) for n in keep])].unsqueeze(1)
        last = nxt
    return forwards


def draft_chain(model, rows: Rows, g: torch.Tensor, k: int, module_cache, draft_vocab):
    """k drafted tokens per row from the module's newest state g [B, 1, d]: (drafts [B, k], q [B, k, V] or
    None when greedy). The k-1 `draft_step`s append k-1 slots to the module's cache."""
    tokens, probs = [], []
    for j in range(k):
        if j:
            g = model.draft_step(g, tokens[-1][:, None], module_cache)
            rows.count_module_forward()
        token, q = module_choice(model, rows, g[:, -1], draft_vocab)
        tokens.append(token)
        probs.append(q)
    drafts = torch.stack(tokens, dim=1)
    return drafts, (None if probs[0] is None else torch.stack(probs, dim=1))
