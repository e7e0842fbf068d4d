"""What every decoding mode shares: per-row statistics, the batch of rows being decoded, the prefill of both
caches, and the module's token choice (full vocabulary or a draft vocabulary). See inference/decoding.py
for the modes and their indices.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from inference.sampling import Sampler


@dataclass
class DecodeStats:
    mode: str
    prompt_tokens: int
    new_tokens: int = 0
    full_forwards: int = 0     # base_step calls while this row was decoding, prefill included
    module_forwards: int = 0   # module_step + draft_step calls, prefill included
    proposed: int = 0          # drafted tokens that verify checked
    accepted: int = 0          # ... and accepted
    seconds: float = 0.0       # the whole call: prefill + decode (shared by the rows of a batch)
    prefill_seconds: float = 0.0   # up to and including the first new token
    draft_len: int = 1
    draft_width: int = 1       # candidates verified side by side for the first drafted token (inference/tree_verify.py)
    lookup: int = 0            # most tokens copied from earlier in the text per cycle (inference/lookup.py)
    temperature: float = 0.0
    batch_size: int = 1
    draft_lens_used: dict | None = None   # --draft-len auto: cycles per k

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tau(self) -> float:
        """Tokens emitted per full forward: 1 for standard, -> 2 for recycle, up to 1 + k for verify."""
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


@dataclass
class BatchGeneration:
    rows: list[Generation]
    seconds: float
    full_forwards: int       # batched base_step calls
    stats: list[DecodeStats] = field(init=False)

    def __post_init__(self):
        self.stats = [r.stats for r in self.rows]

    @property
    def new_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


class Rows:
    """The batch being decoded: prompts, each row's emitted tokens, statistics and whether it is done.

    `emit(b, token)` records a token and says whether row b must stop (token budget spent or EOS)."""

    def __init__(self, prompts: list[list[int]], mode: str, max_new_tokens: int, eos_id, sampler: Sampler,
                 draft_len: int, device):
        self.prompts, self.device = prompts, device
        self.max_new_tokens, self.eos_id, self.sampler = max_new_tokens, eos_id, sampler
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.stats = [DecodeStats(mode, len(p), draft_len=draft_len, temperature=sampler.params.temperature,
                                  batch_size=len(prompts)) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def active(self) -> list[int]:
        return [b for b in range(len(self)) if not self.done[b]]

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def emit(self, b: int, token: int) -> bool:
        self.tokens[b].append(token)
        self.done[b] = len(self.tokens[b]) >= self.max_new_tokens or token == self.eos_id
        return self.done[b]

    def remaining(self, b: int) -> int:
        return self.max_new_tokens - len(self.tokens[b])

    def count_full_forward(self):
        for b in self.active:
            self.stats[b].full_forwards += 1

    def count_module_forward(self):
        for b in self.active:
            self.stats[b].module_forwards += 1

    def tensor(self, columns: list[list[int]]) -> torch.Tensor:
        return torch.tensor(columns, dtype=torch.long, device=self.device)


def prefill(model, rows: Rows, base_cache, start: float):
    """One full forward over the prompts (right-padded to the longest), each row's cache then cut back to
    its own prompt. Returns (h [B, P_max, d], first new token per row)."""
    lens = [len(p) for p in rows.prompts]
    width = max(lens)
    ids = rows.tensor([p + [0] * (width - len(p)) for p in rows.prompts])
    h = model.base_step(ids, base_cache)
    base_cache.rollback([width - n for n in lens])
    rows.count_full_forward()
    last_h = h[torch.arange(len(rows)), torch.tensor(lens) - 1]
    first = rows.sampler.choose(model.logits(last_h)).tolist()
    for b, token in enumerate(first):
        rows.emit(b, token)
        rows.stats[b].prefill_seconds = time.perf_counter() - start
    return h, first


def module_prefill(model, rows: Rows, h, first: list[int], module_cache):
    """The module over every prompt position (next tokens x_1 .. x_n, x_n the first new token); fills its
    cache. Returns g at each row's last prompt position, [B, 1, d] (it predicts x_{n+1})."""
    lens = [len(p) for p in rows.prompts]
    width = max(lens)
    next_ids = rows.tensor([p[1:] + [t] + [0] * (width - len(p)) for p, t in zip(rows.prompts, first)])
    g = model.module_step(h, next_ids, module_cache)
    module_cache.rollback([width - n for n in lens])
    rows.count_module_forward()
    return g[torch.arange(len(rows)), torch.tensor(lens) - 1].unsqueeze(1)


def module_choice(model, rows: Rows, g: torch.Tensor, draft_vocab=None):
    """The module's token for states g [B, d]: returns (tokens [B] tensor, q [B, V] or None when greedy)."""
    sampler = rows.sampler
    if sampler.greedy:
        return module_top1(model, g, draft_vocab), None
    logits = model.logits(g) if draft_vocab is None else draft_vocab.logits(model, g)
    q = sampler.probs(logits)
    tokens = sampler.draw(q)
    if draft_vocab is not None:
        return draft_vocab.to_full(tokens), draft_vocab.scatter(q, model.cfg.vocab_size)
    return tokens, q


def module_top1(model, g: torch.Tensor, draft_vocab=None) -> torch.Tensor:
    """The module's greedy token(s) for states g [..., d]: the argmax over the whole or the draft vocabulary."""
    if draft_vocab is None:
        return model.logits(g).argmax(-1)
    return draft_vocab.to_full(draft_vocab.logits(model, g).argmax(-1))
