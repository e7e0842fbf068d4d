"""The frozen base as a teacher: its forward in module-only training steps (recycle.detach_base), made cheap.

A frozen base only supplies h (the module's input) and, for recycle.target=base or mix, its next-token
distribution. A plain forward pays for two things that are not needed for that (a SmolLM2-135M step with a
1-layer module, depth 2, 4 x 256 tokens on 2 cores: 0.89 s; docs/real-model.md has the measured gain):

- Casting weights (recycle.base_bf16). Autocast casts every fp32 weight to bf16 at every step (it caches casts
  only of weights that require grad), 14 % of that step. `Bf16Copies` casts once and again only when a
  weight changes (a checkpoint load bumps its version). The copies are not parameters: checkpoints and
  exports keep the fp32 base.
- The whole vocabulary. The objective reads the base's logits over the draft vocabulary only
  (the rows of RecycleObjective.module_logits), and the base's own cross-entropy, a constant of frozen weights, is not
  computed in training steps (metrics.jsonl: lm_loss NaN; validation rows still report it and ppl). The
  49152-wide head and its log-softmax were 23 % of that step.

Validation, decoding and joint training use RecycleGPT.hidden / lm_head as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


class Bf16Copies:
    """bf16 copies of the base's decoder layers, final norm and the LM head rows the teacher reads."""

    def __init__(self):
        self.key = None
        self.layers: list[dict] = []
        self.final_norm: dict = {}
        self.head: torch.Tensor | None = None

    @staticmethod
    def usable(model) -> bool:
        """One rank's plain torch weights: megatron's tensor-parallel layers and ZeRO-3's partitioned weights
        (a `ds_id` on each) keep bf16 autocast instead. Asked at the first step, not in freeze_base: ZeRO-3
        partitions the weights after the model is built."""
        return model.spec.tp_size == 1 and not any(hasattr(p, "ds_id") for p in model.parameters())

    def refresh(self, model, rows: torch.Tensor | None):
        params = [*model.layers.parameters(), *model.final_norm.parameters(), model.lm_head.weight]
        key = (tuple((p.data_ptr(), p._version) for p in params), None if rows is None else rows.data_ptr())
        if key == self.key:
            return
        cast = lambda module: {n: p.detach().to(torch.bfloat16) for n, p in module.named_parameters()}  # noqa: E731
        self.layers = [cast(layer) for layer in model.layers]
        self.final_norm = cast(model.final_norm)
        head = model.lm_head.weight.detach()
        self.head = (head if rows is None else head[rows.to(head.device)]).to(torch.bfloat16)
        self.key = key


class FrozenBase:
    """What RecycleGPT.freeze_base sets up: the teacher pass of a training step."""

    def __init__(self, bf16: bool, copy_weights: bool = True, module_bf16: bool = False):
        """copy_weights=False: bf16 by autocast, as before the copies (benchmarks/module_training.py compares)."""
        self.bf16, self.copy_weights, self.module_bf16 = bf16, copy_weights, module_bf16
        self.copies = Bf16Copies()
        self._copies_usable: bool | None = None     # Bf16Copies.usable, asked once at the first step

    def module_autocast(self, device: torch.device):
        """recycle.module_bf16: the module's forward (and so its backward) under bf16 autocast."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.module_bf16)

    @torch.no_grad()
    def teach(self, model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (h in the module's dtype, the base's logits over the objective's teacher rows, or None when the
        objective needs no teacher). Logits are over the rows the module's own logits cover
        (RecycleObjective.module_logits: the draft vocabulary, or all of them), in that order."""
        objective = model.objective
        needs_teacher = objective.base_share > 0
        if self._copies_usable is None:
            self._copies_usable = Bf16Copies.usable(model)
        if self.bf16 and self.copy_weights and self._copies_usable:
            self.copies.refresh(model, objective.draft_ids)
            h = self._hidden_bf16(model, input_ids)
            teacher = F.linear(h, self.copies.head) if needs_teacher else None
        else:
            with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                h = model.hidden(input_ids)
                teacher = objective.module_logits(model.lm_head, h) if needs_teacher else None
        return h.to(model.final_norm.weight.dtype), teacher

    def _hidden_bf16(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        # RecycleGPT.hidden without a cache, each layer run on its bf16 copy of the weights.
        x = model.embedding(input_ids).to(torch.bfloat16)
        cos, sin = model.rotary(0, input_ids.shape[1])
        for layer, weights in zip(model.layers, self.copies.layers):
            x = functional_call(layer, weights, (x, cos, sin))
        return functional_call(model.final_norm, self.copies.final_norm, (x,))
