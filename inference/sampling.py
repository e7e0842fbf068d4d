"""Token choice for every decoding mode: greedy, or sampling with temperature / top-k / top-p, and the
speculative-sampling rule that keeps drafted tokens lossless under sampling.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a drafted token d, drawn from the draft
distribution q, is accepted with probability min(1, p(d) / q(d)), where p is the full model's distribution
at the same position; on rejection the token is drawn from the residual max(0, p - q), normalised. The
emitted token is then distributed exactly as p, whatever q is, so `verify` samples the same text
distribution as `standard`. Greedy decoding is the limit where p and q are one-hot: accept iff equal.

p and q both go through the same temperature / top-k / top-p transform (`Sampler.probs`): the target is the
distribution `standard` samples from, and a q shaped like it is accepted more often.

Randomness comes from one seeded `torch.Generator` on the model's device. Every tensor-parallel rank runs
the same loop on the same (gathered) logits and draws the same numbers in the same order, so the ranks
stay in lockstep without communicating.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0     # 0: greedy (argmax); the other fields are then ignored
    top_k: int = 0               # keep the k most likely tokens (0: all)
    top_p: float = 1.0           # keep the smallest set of most likely tokens with this much mass
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def problems(self) -> list[str]:
        out = []
        if not self.temperature >= 0:
            out.append(f"temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            out.append(f"top-k {self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            out.append(f"top-p {self.top_p} must be in (0, 1]")
        return out


GREEDY = Sampling()


class Sampler:
    def __init__(self, params: Sampling, device):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution [..., V] (fp32) for logits [..., V]: temperature, then top-k, then top-p."""
        p = self.params
        logits = logits.float() / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = logits.topk(p.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the tokens before it already hold top_p; the most likely one always stays.
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of probs [N, V]."""
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Tokens [N] for logits [N, V]: argmax, or a draw from `probs`."""
        if self.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits))

    def accept(self, drafts: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor):
        """Check drafted tokens against the full model.

        drafts [B, k] (token ids), draft_probs [B, k, V] (q at each draft; None when greedy),
        target_logits [B, k + 1, V] (the full model at the position before each draft, and after the last).
        Returns (accepted [B] ints: the length of the accepted prefix, next [B] ints: the token after it),
        as Python lists: the full model's choice where greedy, else a draw from the residual at the first
        rejection (or from p after the last draft when all were accepted).
        """
        B, k = drafts.shape
        if self.greedy:
            target = target_logits.argmax(-1)                                   # [B, k + 1]
            agree = (target[:, :k] == drafts).int()
            accepted = agree.cumprod(-1).sum(-1)
            nxt = target.gather(1, accepted[:, None])[:, 0]
            return accepted.tolist(), nxt.tolist()
        p = self.probs(target_logits)                                           # [B, k + 1, V]
        p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        q_d = draft_probs.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(B, k, generator=self.generator, device=p.device)
        agree = (u * q_d < p_d).int()                                           # u < p/q, q > 0 for a drawn d
        accepted = agree.cumprod(-1).sum(-1)
        rows = torch.arange(B, device=p.device)
        target = p[rows, accepted]                                              # [B, V]
        q_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
        residual = (target - q_padded[rows, accepted]).clamp(min=0)             # q = 0 after the last draft
        mass = residual.sum(-1, keepdim=True)
        # p == q makes rejection impossible in exact arithmetic; should rounding reject anyway, draw from p.
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target)
        return accepted.tolist(), self.draw(residual).tolist()
