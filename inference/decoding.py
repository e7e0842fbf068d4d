"""Greedy decoding with KV caches in three modes (DESIGN.md §2): standard, recycle, verify.

Indices, for a prompt x_0 .. x_{n-1} (positions 0 .. n-1):

- h_i (full model at position i) predicts x_{i+1}; g_i (module at position i, fed h_i and x_{i+1})
  predicts x_{i+2}.
- Prefill: one full forward over the prompt; h_{n-1} gives x_n. `recycle`/`verify` then run the module
  over every prompt position i with next token x_{i+1} (x_n at the last one), which fills the module's
  cache; g_{n-1} gives a guess for x_{n+1}.
- One cycle, with `last` = the newest token the base cache has not seen (x_n) and `guess` (x_{n+1}):
  the full model runs on [last, guess] at positions n, n+1. h_n is the full model's own prediction for
  x_{n+1}; h_{n+1} predicts x_{n+2}. The module runs on positions n, n+1 with next tokens x_{n+1},
  x_{n+2}; g_{n+1} guesses x_{n+3}. Now last = x_{n+2}, guess = x_{n+3}: two tokens per full forward.
- `recycle` never looks at h_n's prediction (lossy). `verify` compares it with the guess; on a mismatch
  it emits h_n's token instead, rolls the base cache back by one slot (the slot that held the wrong
  guess, so h_{n+1} is discarded too) and runs the module on position n alone, with the corrected next
  token. The module's slot for the rejected position is therefore never written, so nothing in its cache
  needs rolling back. Every emitted token is then the full model's greedy choice given a correct prefix,
  so the output equals `standard`'s (up to floating-point ties: a 2-token forward may round differently
  from a 1-token one).

A full forward is counted per `base_step` call (prefill included), a module forward per `module_step` call;
tau = new tokens / full forwards.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

MODES = ("standard", "recycle", "verify")


class DecodingError(ValueError):
    """Bad input to a decoding call (unknown mode, prompt too long, no module); the message names the fix."""


@dataclass
class DecodeStats:
    mode: str
    prompt_tokens: int
    new_tokens: int
    full_forwards: int       # base_step calls, prefill included
    module_forwards: int     # module_step calls, prefill included
    proposed: int            # module guesses that verify checked
    accepted: int            # ... and found equal to the full model's token
    seconds: float           # the whole call: prefill + decode
    prefill_seconds: float   # up to and including the first new token

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tau(self) -> float:
        """Tokens emitted per full forward: 1 for standard, -> 2 for recycle, 1 + acceptance for verify."""
        return self.new_tokens / self.full_forwards if self.full_forwards else float("nan")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "tau": self.tau,
                "acceptance_rate": self.acceptance_rate}


@dataclass
class Generation:
    tokens: list[int]        # the new tokens only (EOS included when it stopped the run)
    stats: DecodeStats


class _Output:
    """Collects emitted tokens; `emit` says whether decoding must stop (token budget spent or EOS)."""

    def __init__(self, max_new_tokens: int, eos_id: int | None):
        self.tokens: list[int] = []
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id

    def emit(self, token: int) -> bool:
        self.tokens.append(token)
        return len(self.tokens) >= self.max_new_tokens or token == self.eos_id


def _greedy(model, states: torch.Tensor) -> list[int]:
    """Argmax tokens for states [1, M, d] (M small). `.tolist()` also synchronises a GPU."""
    return model.logits(states[0]).argmax(-1).tolist()


def _prompt_tensor(prompt_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise DecodingError(f"batch size {ids.shape[0]} is not supported yet; decode one prompt at a time")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise DecodingError("the prompt must be a non-empty list of token ids (batch 1)")
    return ids.view(1, -1)


def _check(model, mode: str, prompt_len: int, max_new_tokens: int):
    if mode not in MODES:
        raise DecodingError(f"unknown decoding mode {mode!r}; valid modes: {', '.join(MODES)}")
    if max_new_tokens < 1:
        raise DecodingError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if mode != "standard" and model.recycle is None:
        raise DecodingError(f"mode {mode!r} needs the recyclable module, but this model has "
                            "recycle_layers = 0; use --mode standard")
    limit = model.cfg.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise DecodingError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")


@torch.inference_mode()
def greedy_generate(model, prompt_ids, mode: str = "standard", max_new_tokens: int = 64,
                    eos_id: int | None = None) -> Generation:
    """Greedy continuation of one prompt (list of ids, or a [P] / [1, P] tensor) in the given mode."""
    device = next(model.parameters()).device
    prompt = _prompt_tensor(prompt_ids, device)
    P = prompt.shape[1]
    _check(model, mode, P, max_new_tokens)
    was_training = model.training
    model.eval()
    # +2: verify writes a guess one slot past the last emitted token before it knows whether to keep it.
    base_cache, module_cache = model.new_caches(1, P + max_new_tokens + 2, device=device)
    out = _Output(max_new_tokens, eos_id)
    stats = DecodeStats(mode, P, 0, 0, 0, 0, 0, 0.0, 0.0)
    start = time.perf_counter()
    try:
        _DECODERS[mode](model, prompt, base_cache, module_cache, out, stats, start)
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(out.tokens)
    return Generation(out.tokens, stats)


def _tensor(tokens: list[int], device) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=device)


def _prefill(model, prompt, base_cache, out: _Output, stats: DecodeStats, start: float):
    """Full forward over the prompt; returns (h for every prompt position, x_n, whether to stop)."""
    h = model.base_step(prompt, base_cache)
    stats.full_forwards += 1
    first = _greedy(model, h[:, -1:])[0]
    stats.prefill_seconds = time.perf_counter() - start
    return h, first, out.emit(first)


def _decode_standard(model, prompt, base_cache, module_cache, out, stats, start):
    _, token, done = _prefill(model, prompt, base_cache, out, stats, start)
    while not done:
        h = model.base_step(_tensor([token], prompt.device), base_cache)
        stats.full_forwards += 1
        token = _greedy(model, h)[0]
        done = out.emit(token)


def _module_prefill(model, prompt, h, first: int, module_cache, stats) -> int:
    """Module over all prompt positions (next tokens x_1 .. x_n); returns its guess for x_{n+1}."""
    next_ids = torch.cat([prompt[:, 1:], _tensor([first], prompt.device)], dim=1)
    g = model.module_step(h, next_ids, module_cache)
    stats.module_forwards += 1
    return _greedy(model, g[:, -1:])[0]


def _decode_recycle(model, prompt, base_cache, module_cache, out, stats, start):
    h, last, done = _prefill(model, prompt, base_cache, out, stats, start)
    if done:
        return
    guess = _module_prefill(model, prompt, h, last, module_cache, stats)
    if out.emit(guess):
        return
    while True:
        # Full model on [x_n, x_{n+1}]: h_{n+1} gives x_{n+2}. x_{n+1} (the module's token) goes unchecked.
        h = model.base_step(_tensor([last, guess], prompt.device), base_cache)
        stats.full_forwards += 1
        token = _greedy(model, h[:, -1:])[0]
        if out.emit(token):
            return
        # Module on positions n, n+1 (next tokens x_{n+1}, x_{n+2}); g_{n+1} gives x_{n+3}.
        g = model.module_step(h, _tensor([guess, token], prompt.device), module_cache)
        stats.module_forwards += 1
        last, guess = token, _greedy(model, g[:, -1:])[0]
        if out.emit(guess):
            return


def _decode_verify(model, prompt, base_cache, module_cache, out, stats, start):
    h, last, done = _prefill(model, prompt, base_cache, out, stats, start)
    if done:
        return
    guess = _module_prefill(model, prompt, h, last, module_cache, stats)
    while True:
        h = model.base_step(_tensor([last, guess], prompt.device), base_cache)
        stats.full_forwards += 1
        check, after = _greedy(model, h)        # h_n's token for x_{n+1}; h_{n+1}'s for x_{n+2}
        stats.proposed += 1
        if check == guess:
            stats.accepted += 1
            if out.emit(guess) or out.emit(after):
                return
            g = model.module_step(h, _tensor([guess, after], prompt.device), module_cache)
            last = after
        else:
            # The slot at n+1 holds the wrong token and h_{n+1} was computed from it: drop both.
            base_cache.rollback(1)
            if out.emit(check):
                return
            g = model.module_step(h[:, :1], _tensor([check], prompt.device), module_cache)
            last = check
        stats.module_forwards += 1
        guess = _greedy(model, g[:, -1:])[0]


_DECODERS = {"standard": _decode_standard, "recycle": _decode_recycle, "verify": _decode_verify}
