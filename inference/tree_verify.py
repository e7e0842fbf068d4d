"""`verify --draft-width W` and `--lookup L`: one full forward checks a tree of fixed candidates.

The candidates are the module's W most likely next tokens (depth 1) and, with --lookup, a chain of up to L
tokens copied from earlier in the text (inference/lookup.py). A drafted token is accepted when it equals the
full model's own next token, so the chance that one of the module's top W tokens is it (its top-W accuracy)
is what the module can gain: on SmolLM2 + the step-1800 variant module, held-out Brown, teacher-forced,
top-1 35.8 %, top-2 47.1 %, top-4 56.6 %, top-8 64.5 % (inference.evaluate's `acceptance_by_width`). Where
a step of a few more tokens costs about what a 1-token one does (packed weights on a CPU, a GPU at batch 1),
checking more candidates is nearly free. This is tree verification (Medusa, EAGLE-2), batch 1, with the
module's depth-1 state as in `verify` k = 1 (inference/drafting.py):

One cycle, with the base cache holding x_0 .. x_{n-1} and `last` = x_n emitted but not yet seen:
1. Draft. The depth-1 state g_{n-1} (already computed by the previous cycle's catch-up) gives the module's
   top W tokens c_1 .. c_W (W = 0: the module stays idle). The lookup chain d_1 .. d_L hangs below the
   candidate equal to d_1, or below x_n as one more candidate.
2. Verify. `GPT.tree_step` runs the full model once on x_n and the tree: every node one position after its
   parent, seeing the cache and its own ancestors only.
3. Accept. From x_n, walk down: the full model's token a after the current node (h of that node); if a child
   of the node is a, move to it and go on, otherwise stop. Emitted: the tokens of the path, then the last a.
   The base cache moves the path's slots to positions n + 1 .. (KVCache.move_slot) and forgets the rest.
   Every emitted token is the full model's choice given the true text before it: lossless.

Sampling (--temperature, --top-k, --top-p) needs no rejection rule here. The candidates are fixed, not drawn,
so each a is simply drawn from the full model's distribution at its node, as `standard` draws it; a
candidate "is accepted" when the draw equals it. Each emitted token is a draw from the distribution
`standard` samples: the same text distribution (tests/test_inference_sampling.py), though not the same text
for a seed, because the draws come in a different order. The chance of a hit is the full model's
probability mass on the candidates.
4. The module's depth caches catch up over the newly verified positions, exactly as for k = 1.
"""
from __future__ import annotations

import torch

from inference.drafting import DraftDepths, verified_texts
from inference.lookup import PromptLookup
from inference.rows import Rows, prefill
from model.gpt import tree_depths


def top_tokens(model, g: torch.Tensor, width: int, draft_vocab=None) -> torch.Tensor:
    """The module's `width` most likely tokens (full-vocabulary ids) for states g [..., d]: [..., width], best
    first, over the whole or the draft vocabulary (inference.evaluate reports how often each width hits)."""
    logits = model.logits(g) if draft_vocab is None else draft_vocab.logits(model, g)
    top = logits.topk(min(width, logits.shape[-1]), dim=-1).indices
    return top if draft_vocab is None else draft_vocab.to_full(top)


def draft_tree(root: int, first: list[int], chain: list[int]) -> tuple[list[int], list[int]]:
    """Tokens and parents of the tree: x_n = `root` (index 0, parent -1), the module's candidates `first` below it,
    then the lookup `chain`, continuing the candidate it starts with or as a branch of its own."""
    tokens, parents = [root] + first, [-1] + [0] * len(first)
    if chain:
        node = 1 + first.index(chain[0]) if chain[0] in first else None
        for token in chain if node is None else chain[1:]:
            tokens.append(token)
            parents.append(0 if node is None else node)
            node = len(tokens) - 1
    return tokens, parents


def accepted_path(tokens: list[int], parents: list[int], choose) -> tuple[list[int], list[int]]:
    """Walk down from the root: `choose(node)` is the full model's token after `node`. Returns the nodes of
    the accepted path (root excluded) and the emitted tokens (the path's, then the last choice)."""
    children: dict[tuple[int, int], int] = {}
    for j in range(1, len(tokens)):
        children.setdefault((parents[j], tokens[j]), j)
    path, emitted, node = [], [], 0
    while True:
        token = choose(node)
        emitted.append(token)
        node = children.get((node, token))
        if node is None:
            return path, emitted
        path.append(node)


def decode_verify_tree(model, rows: Rows, caches, width: int, lookup: int, draft_vocab, start: float) -> int:
    base_cache, module_cache = caches
    h, last = prefill(model, rows, base_cache, start)
    forwards = 1
    if rows.all_done:
        return forwards
    depths = None
    if width > 0:
        depths = DraftDepths(model, rows, module_cache, 1, base_cache.max_len)
        depths.store_h(h, [0])
        depths.catch_up(verified_texts(rows), [True])
    copier = PromptLookup(lookup) if lookup > 0 else None
    stats = rows.stats[0]
    while not rows.all_done:
        text = verified_texts(rows)[0]
        n = len(text) - 1                                           # the position of `last`
        first = top_tokens(model, depths.state_at(1, [n - 1])[0], width, draft_vocab).tolist() if depths else []
        # A copy never reaches past the token budget (the deepest node sits at n + its length; emitted: that + 1).
        chain = copier.propose(text, rows.remaining(0) - 1) if copier else []
        tokens, parents = draft_tree(text[-1], first, chain)
        h = model.tree_step(rows.tensor([tokens]), base_cache, parents)
        rows.count_full_forward()
        forwards += 1
        logits = model.logits(h[0])                                 # row j: the full model's next token after node j
        path, emitted = accepted_path(tokens, parents, lambda j: int(rows.sampler.choose(logits[j:j + 1])[0]))
        stats.proposed += max(tree_depths(parents))
        stats.accepted += len(path)
        for token in emitted:
            if rows.emit(0, token):
                break
        for i, node in enumerate(path, start=1):                    # keep x_n and the path at positions n, n + 1 ..
            base_cache.move_slot(n + node, n + i)
        base_cache.rollback(len(tokens) - 1 - len(path))
        if rows.all_done:
            break
        if depths:
            depths.store_h(h[:, [0] + path], [n])
            depths.catch_up(verified_texts(rows), [True])
    return forwards

