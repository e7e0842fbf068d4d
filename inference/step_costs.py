"""Seconds of the steps decoding is made of, at a fixed cache length (DESIGN.md §2).

    full_M     an M-token full step plus the LM head on all M positions (verify reads them all), M = 1 .. K+1
    module_1   a 1-position module step plus its LM head (a draft step)
    module_2   a 2-position module step plus the LM head on its last position (recycle's module step)
    module_refresh  a 1-position module step without any LM head (verify's deeper-depth refresh pass)
    *_dv       the same over a draft vocabulary, when one is given (f_dv, f_2_dv)

Every sample rolls its cache back afterwards, so all samples see the same cache length. `sample` is meant
to be called between decoding runs, so the timings share the machine's load with them; `summary` takes
medians and gives the ratios c(M)/c(1) and f = module_1 / full_1 (and f_2 = module_2 / full_1).
"""
from __future__ import annotations

import statistics
import time

import torch


class StepCosts:
    def __init__(self, model, prompt: list[int], context_len: int, max_tokens: int = 2, batch: int = 1,
                 draft_vocab=None):
        self.model, self.context_len, self.draft_vocab = model, context_len, draft_vocab
        device = next(model.parameters()).device
        reps = (context_len + max_tokens + 2) // len(prompt) + 1
        self.ids = torch.tensor([(prompt * reps)[:context_len + max_tokens + 2]] * batch, device=device)
        self.base, self.module = model.new_caches(batch, context_len + max_tokens + 2, device=device)
        with torch.inference_mode():
            h = model.base_step(self.ids[:, :context_len], self.base)
            if self.module is not None:
                model.module_step(h, self.ids[:, 1:context_len + 1], self.module)
            self.h2 = model.base_step(self.ids[:, context_len:context_len + 2], self.base)
            self.base.rollback(2)
        self.kinds = {f"full_{m}": (lambda m=m: self._full(m)) for m in range(1, max_tokens + 1)}
        if self.module is not None:
            for vocab in [None] + ([draft_vocab] if draft_vocab is not None else []):
                tag = "" if vocab is None else "_dv"
                self.kinds["module_1" + tag] = lambda vocab=vocab: self._module_1(vocab)
                self.kinds["module_2" + tag] = lambda vocab=vocab: self._module_2(vocab)
            self.kinds["module_refresh"] = lambda: self._module_1(None, head=False)
        self.times = {k: [] for k in self.kinds}
        self.sample(2, keep=False)           # warmup

    def _sync(self, t: torch.Tensor):
        t.tolist()                           # what decoding does with its tokens; also waits for a GPU

    def _full(self, m: int):
        c = self.context_len
        self._sync(self.model.logits(self.model.base_step(self.ids[:, c:c + m], self.base)).argmax(-1))
        self.base.rollback(m)

    def _module_logits(self, g, vocab):
        return self.model.logits(g) if vocab is None else vocab.logits(self.model, g)

    def _module_1(self, vocab, head: bool = True):
        c = self.context_len
        g = self.model.draft_step(self.h2[:, -1:], self.ids[:, c + 2:c + 3], self.module)
        self._sync(self._module_logits(g[:, -1], vocab).argmax(-1) if head else g[:, -1, :1])
        self.module.rollback(1)

    def _module_2(self, vocab):
        c = self.context_len
        g = self.model.module_step(self.h2, self.ids[:, c + 1:c + 3], self.module)
        self._sync(self._module_logits(g[:, -1], vocab).argmax(-1))
        self.module.rollback(2)

    def sample(self, rounds: int, keep: bool = True):
        with torch.inference_mode():
            for _ in range(rounds):
                for name, fn in self.kinds.items():
                    start = time.perf_counter()
                    fn()
                    if keep:
                        self.times[name].append(time.perf_counter() - start)

    def summary(self) -> dict:
        t = {k: statistics.median(v) for k, v in self.times.items()}
        ms = sorted(int(k.split("_")[1]) for k in t if k.startswith("full_"))
        out = {"context_len": self.context_len, "samples": len(self.times["full_1"]),
               "full_s": {m: t[f"full_{m}"] for m in ms},
               "cost_ratio": {m: t[f"full_{m}"] / t["full_1"] for m in ms},
               "full_1_s": t["full_1"]}
        if 2 in out["cost_ratio"]:
            out["c2_over_c1"] = out["cost_ratio"][2]
        if "module_1" in t:
            out.update(module_1_s=t["module_1"], module_2_s=t["module_2"], f=t["module_1"] / t["full_1"],
                       f_2=t["module_2"] / t["full_1"], f_refresh=t["module_refresh"] / t["full_1"])
            if "c2_over_c1" in out:
                out["recycle_bound"] = 2 / (out["c2_over_c1"] + out["f_2"])
        if "module_1_dv" in t:
            out.update(module_1_dv_s=t["module_1_dv"], f_dv=t["module_1_dv"] / t["full_1"],
                       f_2_dv=t["module_2_dv"] / t["full_1"])
            if "c2_over_c1" in out:
                out["recycle_bound_dv"] = 2 / (out["c2_over_c1"] + out["f_2_dv"])
        return out


def measure(model, prompt: list[int], context_len: int, max_tokens: int, rounds: int = 12, draft_vocab=None) -> dict:
    """One-off measurement (generate's `--draft-len auto`): the summary after `rounds` samples of each step.
    Under tensor parallelism every rank must decide alike, so rank 0's figures are broadcast."""
    costs = StepCosts(model, prompt, context_len, max_tokens, draft_vocab=draft_vocab)
    costs.sample(rounds)
    return same_on_every_rank(costs.summary())


def same_on_every_rank(summary: dict) -> dict:
    """Rank 0's figures on every rank: timings differ per rank, decisions taken from them must not."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [summary]
        torch.distributed.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary
