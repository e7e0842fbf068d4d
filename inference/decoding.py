"""Decoding with KV caches in three modes (DESIGN.md §2): standard, recycle, verify; batch 1 or more.

Indices, for a prompt x_0 .. x_{n-1} (positions 0 .. n-1):

- h_i (full model at position i) predicts x_{i+1}; g_i (module at position i, fed h_i and x_{i+1})
  predicts x_{i+2}.
- Prefill: one full forward over the prompt; h_{n-1} gives x_n. `recycle`/`verify` then run the module
  over every prompt position i with next token x_{i+1} (x_n at the last one), which fills the module's
  cache; g_{n-1} gives a guess for x_{n+1}.
- `recycle` (lossy, the paper's schedule), with `last` = x_n and `guess` = x_{n+1}: the full model runs on
  [last, guess] at positions n, n+1 and h_{n+1} gives x_{n+2}; the module runs on positions n, n+1 with next
  tokens x_{n+1}, x_{n+2}, and g_{n+1} guesses x_{n+3}. Two tokens per full forward; the guess is never
  checked.
- `verify` (lossless; inference/drafting.py): the module drafts `draft_len` tokens, one full forward over
  [last, drafts] checks them, the accepted prefix plus the full model's own next token are emitted.

Tokens are chosen by `inference.sampling` (greedy, or sampling with a seeded generator; `verify` stays
lossless under sampling by speculative sampling). Several prompts decode as one batch: each row has its
own cache length (model/kv_cache.py), accepts its own drafts and stops on its own; a finished row rides
along until the batch is done, its caches rolled back so they never grow.

A full forward is counted per `base_step` call (prefill included), a module forward per `module_step` or
`draft_step` call; tau = new tokens / full forwards, per row.
"""
from __future__ import annotations

import time

import torch

from inference.draft_policy import AutoDraftLen, FixedDraftLen, draft_costs
from inference.drafting import decode_verify
from inference.rows import (  # noqa: F401  (DecodeStats, Generation: part of the API)
    BatchGeneration, DecodeStats, Generation, Rows, module_choice, module_prefill, prefill)
from inference.sampling import GREEDY, Sampler, Sampling
from inference.tree_verify import decode_verify_tree

MODES = ("standard", "recycle", "verify")
LOSSLESS = ("standard", "verify")


class DecodingError(ValueError):
    """Bad input to a decoding call (unknown mode, prompt too long, no module); the message names the fix."""


# ------------------------------------------------------------------------------------------- input checks
def _prompt_list(prompt_ids) -> list[int]:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise DecodingError(f"batch size {ids.shape[0]}: pass several prompts to generate_batch, "
                                "or decode one prompt at a time")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise DecodingError("the prompt must be a non-empty list of token ids")
    return ids.tolist()


def check_request(model, mode: str, prompt_lens: list[int], max_new_tokens: int, sampling: Sampling):
    if mode not in MODES:
        raise DecodingError(f"unknown decoding mode {mode!r}; valid modes: {', '.join(MODES)}")
    if max_new_tokens < 1:
        raise DecodingError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if sampling.problems():
        raise DecodingError("; ".join(sampling.problems()))
    if mode != "standard" and model.recycle is None:
        raise DecodingError(f"mode {mode!r} needs the recyclable module, but this model has "
                            "recycle_layers = 0; use --mode standard")
    if not prompt_lens or min(prompt_lens) == 0:
        raise DecodingError("every prompt must be a non-empty list of token ids")
    limit = model.cfg.max_seq_len
    if max(prompt_lens) + max_new_tokens > limit:
        raise DecodingError(f"prompt ({max(prompt_lens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")


# --------------------------------------------------------------------------------------------- entry points
@torch.inference_mode()
def generate_batch(model, prompts, mode: str = "standard", max_new_tokens: int = 64, eos_id: int | None = None,
                   *, draft_len=1, sampling: Sampling = GREEDY, draft_vocab=None,
                   max_auto_draft_len: int = 4, draft_width: int = 1, lookup: int = 0) -> BatchGeneration:
    """Continue several prompts (lists of ids) in one batch; each row's tokens equal its batch-1 tokens
    (greedy, fp32). `draft_len`: tokens the module drafts per verify cycle, 'auto' (measure the step costs
    now, then pick k <= max_auto_draft_len per cycle), or a policy from inference.draft_policy;
    `draft_vocab`: an inference.draft_vocab.DraftVocab for the module's logits (verify and recycle);
    `draft_width`: verify's W most likely first drafts checked side by side (inference/tree_verify.py);
    `lookup`: verify also drafts up to this many tokens copied from earlier in the text (inference/lookup.py)."""
    prompts = [_prompt_list(p) for p in prompts]
    check_request(model, mode, [len(p) for p in prompts], max_new_tokens, sampling)
    check_width(draft_width, mode, draft_len, len(prompts), lookup)
    if isinstance(draft_len, (FixedDraftLen, AutoDraftLen)):
        policy = draft_len
    elif draft_len == "auto":
        policy = None           # measured below, once the model is in eval mode
    elif isinstance(draft_len, int) and draft_len >= 1:
        policy = FixedDraftLen(draft_len)
    else:
        raise DecodingError(f"draft_len={draft_len!r} must be an int >= 1 (1 = one drafted token per full "
                            "forward) or 'auto'")
    device = next(model.parameters()).device
    if draft_vocab is not None:
        try:
            draft_vocab.check(model.cfg.vocab_size)
        except ValueError as err:
            raise DecodingError(str(err)) from None
        draft_vocab.to(device)
    was_training = model.training
    model.eval()
    if policy is None:
        policy = (auto_policy(model, prompts[0], max_new_tokens, max_auto_draft_len, draft_vocab)
                  if mode == "verify" else FixedDraftLen(1))
    max_k = policy.max_k if isinstance(policy, AutoDraftLen) else policy.k
    # Room for verify's drafts past the last emitted token before it knows which to keep.
    cache_len = max(len(p) for p in prompts) + max_new_tokens + max(max_k, draft_width + lookup) + 1
    caches = model.new_caches(len(prompts), cache_len, device=device)
    rows = Rows(prompts, mode, max_new_tokens, eos_id, Sampler(sampling, device), max_k, device)
    start = time.perf_counter()
    try:
        if mode == "verify" and (draft_width != 1 or lookup):
            forwards = decode_verify_tree(model, rows, caches, draft_width, lookup, draft_vocab, start)
        elif mode == "verify":
            forwards = decode_verify(model, rows, caches, policy, draft_vocab, start)
        else:
            forwards = _DECODERS[mode](model, rows, caches, draft_vocab, start)
    finally:
        model.train(was_training)
    if mode == "verify":        # the k used most (auto may change it between cycles)
        for s in rows.stats:
            s.draft_len = max(policy.used, key=policy.used.get) if policy.used else max_k
            s.draft_lens_used = dict(policy.used) if isinstance(policy, AutoDraftLen) else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for b, s in enumerate(rows.stats):
        s.seconds, s.new_tokens, s.draft_width, s.lookup = seconds, len(rows.tokens[b]), draft_width, lookup
    return BatchGeneration([Generation(t, s) for t, s in zip(rows.tokens, rows.stats)], seconds, forwards)


def check_width(width, mode: str, draft_len, batch: int, lookup=0):
    """The token-tree flags (inference/tree_verify.py): --draft-width W and --lookup L."""
    if not isinstance(lookup, int) or lookup < 0:
        raise DecodingError(f"lookup={lookup!r} must be an int >= 0 (0 = off; L = draft up to L tokens copied from "
                            "earlier in the text)")
    if not isinstance(width, int) or width < (0 if lookup else 1):
        raise DecodingError(f"draft_width={width!r} must be an int >= 1 (1 = one candidate per drafted token; 0 only "
                            "with --lookup: the module idle)")
    if width == 1 and not lookup:
        return
    flag = f"--draft-width {width}" if not lookup else f"--lookup {lookup}"
    problem = ("it applies to mode verify only" if mode != "verify" else
               "it needs --draft-len 1 (a tree below one full-model token)" if draft_len != 1 else
               "it decodes one prompt at a time (batch 1)" if batch != 1 else None)
    if problem:
        raise DecodingError(f"{flag}: {problem}; or leave it out" if lookup else
                            f"{flag}: {problem}; or use --draft-width 1")


def auto_policy(model, prompt: list[int], max_new_tokens: int, max_k: int, draft_vocab=None) -> AutoDraftLen:
    """`--draft-len auto`: the step costs measured now, at the mid-generation cache length."""
    from inference.step_costs import measure

    context = min(len(prompt) + max_new_tokens // 2, model.cfg.max_seq_len - max_k - 3)
    costs = measure(model, prompt, context, max_k + 1, draft_vocab=draft_vocab)
    return AutoDraftLen(costs["cost_ratio"], *draft_costs(costs, draft_vocab is not None))


def generate(model, prompt_ids, mode: str = "standard", max_new_tokens: int = 64, eos_id: int | None = None,
             *, draft_len=1, sampling: Sampling = GREEDY, draft_vocab=None, draft_width: int = 1,
             lookup: int = 0) -> Generation:
    """Continue one prompt (list of ids, or a [P] / [1, P] tensor); see generate_batch."""
    return generate_batch(model, [_prompt_list(prompt_ids)], mode, max_new_tokens, eos_id, draft_len=draft_len,
                          sampling=sampling, draft_vocab=draft_vocab, draft_width=draft_width,
                          lookup=lookup).rows[0]


def greedy_generate(model, prompt_ids, mode: str = "standard", max_new_tokens: int = 64,
                    eos_id: int | None = None, draft_len=1) -> Generation:
    """Greedy continuation of one prompt (the original API; `generate` adds sampling and a draft vocabulary)."""
    return generate(model, prompt_ids, mode, max_new_tokens, eos_id, draft_len=draft_len)


# ------------------------------------------------------------------------------------------------ modes
def _decode_standard(model, rows: Rows, caches, draft_vocab, start) -> int:
    base_cache, _ = caches
    _, last = prefill(model, rows, base_cache, start)
    forwards = 1
    while not rows.all_done:
        active = rows.active
        was_active = set(active)
        h = model.base_step(rows.tensor([[t] for t in last]), base_cache)
        rows.count_full_forward()
        forwards += 1
        last = rows.sampler.choose(model.logits(h[:, 0])).tolist()
        for b in active:
            rows.emit(b, last[b])
        base_cache.rollback([1 if b not in was_active else 0 for b in range(len(rows))])
    return forwards


def _decode_recycle(model, rows: Rows, caches, draft_vocab, start) -> int:
    base_cache, module_cache = caches
    h, last = prefill(model, rows, base_cache, start)
    forwards = 1
    if rows.all_done:
        return forwards
    g = module_prefill(model, rows, h, last, module_cache)
    guess = module_choice(model, rows, g[:, 0], draft_vocab)[0].tolist()
    for b in rows.active:
        rows.emit(b, guess[b])
    while not rows.all_done:
        active = rows.active
        was_active = set(active)
        # Full model on [x_n, x_{n+1}]: h_{n+1} gives x_{n+2}. x_{n+1} (the module's token) goes unchecked.
        h = model.base_step(rows.tensor([[a, b] for a, b in zip(last, guess)]), base_cache)
        rows.count_full_forward()
        forwards += 1
        token = rows.sampler.choose(model.logits(h[:, -1])).tolist()
        for b in active:
            rows.emit(b, token[b])
        if rows.all_done:
            break
        # Module on positions n, n+1 (next tokens x_{n+1}, x_{n+2}); g_{n+1} gives x_{n+3}.
        g = model.module_step(h, rows.tensor([[a, b] for a, b in zip(guess, token)]), module_cache)
        rows.count_module_forward()
        last, guess = token, module_choice(model, rows, g[:, -1], draft_vocab)[0].tolist()
        for b in rows.active:
            rows.emit(b, guess[b])
        # Rows that finished stop growing (their caches would otherwise outrun the others' forever).
        frozen = [2 if b not in was_active else 0 for b in range(len(rows))]
        base_cache.rollback(frozen)
        module_cache.rollback(frozen)
    return forwards


_DECODERS = {"standard": _decode_standard, "recycle": _decode_recycle}
