"""Prompt lookup (`verify --lookup L`): drafts copied from earlier in the text, no model run to make them.

When the last n tokens of the verified text (prompt + output) occurred before, the L tokens that followed
their most recent earlier occurrence are a likely continuation: text that quotes its prompt, lists, code,
and the loops small models fall into at greedy decoding all repeat themselves. transformers' prompt lookup
decoding and vLLM's `ngram` speculative method draft this way. Here the copied tokens join the module's
candidates in one token tree (inference/tree_verify.py), so a cycle gains from whichever is right, and every
emitted token is still the full model's own choice: lossless.

The longest suffix wins (n = NGRAM_MAX down to NGRAM_MIN), then the most recent occurrence. A 1-token
match is a weak hint, but a wrong draft costs only the extra rows of the verify step; measured on SmolLM2
+ module, held-out Brown prompts (docs/inference.md), n down to 1 gave the most tokens per forward.
"""
from __future__ import annotations

NGRAM_MAX = 3
NGRAM_MIN = 1


class PromptLookup:
    """An index of the n-grams of a growing text: n-gram -> the end of its most recent occurrence that has a
    token after it. The text only grows (verified tokens are never taken back), so each call indexes just
    the tokens added since the last one."""

    def __init__(self, max_tokens: int, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"n-gram sizes {ngram_min}..{ngram_max}: need 1 <= min <= max")
        self.max_tokens, self.ngram_max, self.ngram_min = max_tokens, ngram_max, ngram_min
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0          # n-grams ending before this index are in `ends`

    def propose(self, text: list[int], limit: int | None = None) -> list[int]:
        """Up to min(max_tokens, limit) tokens that followed the longest suffix of `text` seen before it."""
        if len(text) < self.indexed:
            raise ValueError("the text got shorter: a PromptLookup follows one growing text")
        for end in range(max(self.indexed, 1), len(text)):     # text[end - n:end] is followed by text[end]
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self.ends[tuple(text[end - n:end])] = end
        self.indexed = len(text)
        count = self.max_tokens if limit is None else min(self.max_tokens, limit)
        if count <= 0:
            return []
        for n in range(min(self.ngram_max, len(text)), self.ngram_min - 1, -1):
            end = self.ends.get(tuple(text[-n:]))
            if end is not None:
                return text[end:end + count]
        return []
