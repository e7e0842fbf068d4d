"""How many tokens to draft per verify cycle: a fixed k, or `auto` from measured costs and acceptance.

With k drafts a cycle costs one (k+1)-token full step, k module steps that draft (each with its LM head) and
k - 1 refresh passes of the deeper depths after verification (module layers only, inference/drafting.py step 3),
in units of a 1-token full step:

    cost(k)   = c(k+1)/c(1) + k * f + (k - 1) * f_refresh
                (f: one module step with its LM head, over c(1); f_refresh: one without the head)
    tokens(k) = 1 + sum_{j=1..k} a_1 * ... * a_j

where a_j is the chance that draft j is accepted once drafts 1 .. j-1 were (measured per depth). The
speedup over `standard` is tokens(k) / cost(k), and `auto` drafts the k that maximises it, re-deciding after
every cycle as the acceptance estimates sharpen. It starts at the largest k, so every depth gets measured.
The costs are measured once before decoding (inference/step_costs.py); the decision uses only them and the
acceptance counts, which are the same on every tensor-parallel rank, so the ranks stay in lockstep.
"""
from __future__ import annotations


def expected_tokens(acceptance: list[float], k: int) -> float:
    """tokens(k) for per-depth acceptance a_1 .. a_K (k <= K)."""
    total, run = 1.0, 1.0
    for a in acceptance[:k]:
        run *= a
        total += run
    return total


def draft_costs(costs: dict, over_draft_vocab: bool) -> tuple[float, float]:
    """(f, f_refresh) from a StepCosts summary: a draft's LM head runs over the draft vocabulary when there is one."""
    return costs["f_dv" if over_draft_vocab else "f"], costs["f_refresh"]


def cycle_cost(k: int, cost_ratio: dict[int, float], f: float, f_refresh: float = 0.0, width: int = 1) -> float:
    """cost(k) in units of c(1); cost_ratio[M] = c(M)/c(1). With `width` W (k = 1, inference/tree_verify.py) the
    full step checks W first drafts side by side: 1 + k + W - 1 tokens."""
    return cost_ratio[k + width] + k * f + (k - 1) * f_refresh


def predicted_speedup(acceptance: list[float], k: int, cost_ratio: dict[int, float], f: float,
                      f_refresh: float = 0.0) -> float:
    """tokens(k) / cost(k)."""
    return expected_tokens(acceptance, k) / cycle_cost(k, cost_ratio, f, f_refresh)


def best_draft_len(acceptance: list[float], cost_ratio: dict[int, float], f: float, f_refresh: float = 0.0) -> int:
    ks = [k for k in range(1, len(acceptance) + 1) if k + 1 in cost_ratio]
    return max(ks, key=lambda k: predicted_speedup(acceptance, k, cost_ratio, f, f_refresh))


class FixedDraftLen:
    def __init__(self, k: int):
        self.k = k

    def next_k(self) -> int:
        return self.k

    def record(self, k: int, accepted: list[int]):
        pass

    @property
    def used(self) -> dict[int, int]:
        return {self.k: 1}


class AutoDraftLen:
    """Picks k per cycle from `cost_ratio` (c(M)/c(1) for M = 1 .. K+1) and `f`, with acceptance per depth
    counted over the cycles so far (add-one smoothed, so an unmeasured depth counts as a coin flip)."""

    def __init__(self, cost_ratio: dict[int, float], f: float, f_refresh: float = 0.0):
        self.cost_ratio, self.f, self.f_refresh = dict(cost_ratio), f, f_refresh
        self.max_k = max(cost_ratio) - 1
        if self.max_k < 1:
            raise ValueError("auto draft length needs c(M)/c(1) for M = 1 .. K+1 with K >= 1")
        self.tested = [0] * self.max_k
        self.passed = [0] * self.max_k
        self.k = self.max_k
        self.used: dict[int, int] = {}

    @property
    def acceptance(self) -> list[float]:
        return [(p + 1) / (t + 2) for p, t in zip(self.passed, self.tested)]

    def next_k(self) -> int:
        return self.k

    def record(self, k: int, accepted: list[int]):
        """One cycle's outcome: k drafted, accepted[b] of them accepted in row b."""
        self.used[k] = self.used.get(k, 0) + 1
        for a in accepted:
            for depth in range(min(a + 1, k)):       # depths 1 .. a passed; depth a+1 (if drafted) failed
                self.tested[depth] += 1
                self.passed[depth] += depth < a
        self.k = best_draft_len(self.acceptance, self.cost_ratio, self.f, self.f_refresh)
