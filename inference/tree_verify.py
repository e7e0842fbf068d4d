"""`verify --draft-width W`: the module's W most likely tokens verified side by side in one full forward.

A drafted token is accepted when it equals the full model's own next token, so the chance that one of the
module's top W tokens is it (its top-W accuracy) is what a cycle can gain: on SmolLM2 + the step-1800 variant
module, held-out Brown, teacher-forced, top-1 35.8 %, top-2 47.1 %, top-4 56.6 %, top-8 64.5 %
(inference.evaluate's `acceptance_by_width`). Where a step of 1 + W tokens costs about what a 1-token one does
(packed weights on a CPU, a GPU at batch 1), checking W candidates instead of one is nearly free. This is a
depth-1 token tree (Medusa, EAGLE-2 verify trees), batch 1, the drafting side of `verify` k = 1 unchanged
(inference/drafting.py):

One cycle, with the base cache holding x_0 .. x_{n-1} and `last` = x_n emitted but not yet seen:
1. Draft. The depth-1 state g_{n-1} (already computed by the previous cycle's catch-up) gives the module's
   logits over the whole or the draft vocabulary; its top W tokens c_1 .. c_W are the candidates.
2. Verify. `GPT.tree_step` runs the full model once on [x_n, c_1 .. c_W]: x_n at position n, every c_j at
   n + 1, each c_j seeing the cache, x_n and itself only. h_n gives the full model's token a = x_{n+1}.
3. Accept. If a = c_j for some j, h_{n+1} of c_j gives the token after it: emitted a, then that token; the
   base cache copies c_j's slot to position n + 1 and forgets the rest. Otherwise a alone is emitted and the
   cache keeps x_n only. Either way every emitted token is the full model's choice given the true text
   before it: lossless.

Sampling (--temperature, --top-k, --top-p) needs no rejection rule here. The candidates are fixed, not drawn,
so a is simply drawn from the full model's distribution at n, as `standard` draws it; a candidate "is
accepted" when the draw equals it, and the token after it is drawn from c_j's distribution, which is the full
model's at n + 1 given a. Each emitted token is a draw from the distribution `standard` samples: the same
text distribution (tests/test_inference_sampling.py), though not the same text for a seed, because the draws
come in a different order. The chance of a hit is the full model's probability mass on the W candidates.
4. The module's depth caches catch up over the newly verified positions, exactly as for k = 1.
"""
from __future__ import annotations

import torch

from inference.drafting import DraftDepths, verified_texts
from inference.rows import Rows, prefill


def top_tokens(model, g: torch.Tensor, width: int, draft_vocab=None) -> torch.Tensor:
    """The module's `width` most likely tokens (full-vocabulary ids) for states g [..., d]: [..., width], best
    first, over the whole or the draft vocabulary (inference.evaluate reports how often each width hits)."""
    logits = model.logits(g) if draft_vocab is None else draft_vocab.logits(model, g)
    top = logits.topk(min(width, logits.shape[-1]), dim=-1).indices
    return top if draft_vocab is None else draft_vocab.to_full(top)


def decode_verify_width(model, rows: Rows, caches, width: int, draft_vocab, start: float) -> int:
    base_cache, module_cache = caches
    h, last = prefill(model, rows, base_cache, start)
    forwards = 1
    if rows.all_done:
        return forwards
    depths = DraftDepths(model, rows, module_cache, 1, base_cache.max_len)
    depths.store_h(h, [0])
    depths.catch_up(verified_texts(rows), [True])
    stats = rows.stats[0]
    while not rows.all_done:
        text = verified_texts(rows)[0]
        n = len(text) - 1                                           # the position of `last`
        drafts = top_tokens(model, depths.state_at(1, [n - 1])[0], width, draft_vocab).tolist()
        h = model.tree_step(rows.tensor([[text[-1]] + drafts]), base_cache, [-1] + [0] * len(drafts))
        rows.count_full_forward()
        forwards += 1
        logits = model.logits(h[0])                                 # [0]: before x_{n+1}; [1 + j]: after c_j
        first = int(rows.sampler.choose(logits[:1])[0])
        hit = drafts.index(first) if first in drafts else None
        stats.proposed += 1
        stats.accepted += hit is not None
        emitted = [first] + ([int(rows.sampler.choose(logits[1 + hit:2 + hit])[0])] if hit is not None else [])
        for token in emitted:
            if rows.emit(0, token):
                break
        if hit is not None:                                         # keep x_n and c_hit, at positions n, n + 1
            base_cache.move_slot(n + 1 + hit, n + 1)
            base_cache.rollback(len(drafts) - 1)
            depths.store_h(torch.stack([h[:, 0], h[:, 1 + hit]], dim=1), [n])
        else:
            base_cache.rollback(len(drafts))
            depths.store_h(h[:, :1], [n])
        if rows.all_done:
            break
        depths.catch_up(verified_texts(rows), [True])
    return forwards
