"""RecycleGPT: a LLaMA-style decoder plus the recyclable module, readable top to bottom.

    tokens -> E -> N_base decoder layers -> final RMSNorm -> h -> W_out -> logits (predict x_{i+1})
    (h_i, E[x_{i+1}]) -> recyclable module -> g_i -> W_out -> logits (predict x_{i+2})

Training loss: L = L_lm + lambda * L_rec, both token means (model/objective.py, also for the module's deeper
draft depths and the base-distribution target). Decoding uses `base_step` / `module_step` with one KV cache
each (inference/ alternates them); `draft_step` applies the module to its own state (model/recycle.py).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from model.config import ModelConfig
from model.frozen_base import FrozenBase
from model.kv_cache import KVCache
from model.layers import DecoderLayer, RMSNorm, Rotary, run_stack
from model.objective import RecycleObjective
from model.recycle import RecyclableModule
from model.spec import LocalSpec


@torch.no_grad()
def init_parameter(cfg: ModelConfig, name: str, p: torch.Tensor, generator: torch.Generator | None = None):
    """Normal(0, std) everywhere; output projections scaled by 1/sqrt(2 * depth) as in GPT-2.

    One parameter at a time, by its full name, so parallel/ can reproduce the one-device initialisation
    parameter by parameter (and shard it) without materialising a 7B model.
    """
    std = cfg.init_std
    depth = cfg.num_layers + cfg.recycle_layers
    if name.endswith("norm.weight"):
        p.fill_(1.0)
    elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        p.normal_(0.0, std / (2 * depth) ** 0.5, generator=generator)
    else:
        p.normal_(0.0, std, generator=generator)


def tree_depths(parents: list[int]) -> list[int]:
    """Each token's depth in a token tree given its parent's index (-1: below the cache, depth 0)."""
    depth = []
    for parent in parents:
        if not -1 <= parent < len(depth):
            raise ValueError(f"tree parents {parents}: each must be -1 or an earlier token's index")
        depth.append(0 if parent < 0 else depth[parent] + 1)
    return depth


class RecycleGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, spec=None):
        super().__init__()
        spec = spec or LocalSpec()
        self.cfg, self.spec = cfg, spec
        self.embedding = spec.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = spec.lm_head(cfg.hidden_size, cfg.vocab_size)
        self.recycle = RecyclableModule(cfg, spec) if cfg.recycle_layers else None
        # +2: the module looks one position ahead, and verify mode feeds two tokens past the last one.
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len + 2, cfg.rope_theta, cfg.rope_scaling_args)
        self.objective = RecycleObjective()   # lambda, target, train depth (pretrain's recycle.* keys)
        self.detach_base = False        # True: the base is frozen and runs without autograd (freeze_base)
        self.base_bf16 = False          # True: the frozen base's forward runs in bf16 (freeze_base)
        self.frozen: FrozenBase | None = None   # the frozen base's teacher pass in training steps (freeze_base)
        self.activation_checkpointing = False
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        for name, p in self.named_parameters():
            init_parameter(self.cfg, name, p, generator)

    # ---------------------------------------------------------------------------------- the network
    def hidden(self, input_ids: torch.Tensor, start_pos: int | list[int] = 0, cache: KVCache | None = None):
        """The full model's final hidden state h (after the final norm) for the given tokens."""
        x = self.embedding(input_ids)
        T = input_ids.shape[1]
        cos, sin = self.rotary(start_pos, T)
        x = run_stack(self.layers, x, cos, sin, cache, self.activation_checkpointing)
        return self.final_norm(x)

    def recycle_hidden(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int | list[int] = 0,
                       cache: KVCache | None = None):
        """g: the module's state for positions start_pos.., given h there and the tokens that follow."""
        if self.recycle is None:
            raise ValueError("this model has no recyclable module (model.recycle_layers = 0)")
        return self.recycle(h, self.embedding(next_ids), self.rotary, start_pos, cache)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """Training loss. labels[i] = x_{i+1}; the module at i reads E[labels[i]] and targets labels[i+1]
        (depth j: reads E[labels[i+j-1]], targets labels[i+j])."""
        self.recycle_activation_checkpointing()
        teaching = self.frozen is not None and self.training and self.recycle is not None
        if teaching:
            # Module-only training step: the frozen base is a teacher only (model/frozen_base.py).
            h, lm_logits = self.frozen.teach(self, input_ids)
        else:
            # A frozen base needs no graph: no activations stored, no autograd bookkeeping; only the module's
            # path (its layers and the LM head applied to g) builds one.
            with torch.no_grad() if self.detach_base else nullcontext(), self._base_autocast(input_ids.device):
                h = self.hidden(input_ids)
                lm_logits = self.lm_head(h)
        rec_logits = []
        if self.recycle is not None:
            with torch.no_grad() if self.detach_base else nullcontext():
                next_embeds = self.embedding(labels)
            h = h.to(self.final_norm.weight.dtype)   # bf16-rounded under base_bf16; the module runs in its own dtype
            with self.frozen.module_autocast(input_ids.device) if teaching else nullcontext():
                states = self.recycle.unroll(h, next_embeds, self.rotary, self.objective.depth)
                rec_logits = [self.objective.module_logits(self.lm_head, g) for g in states]
        return self.objective(self.spec, lm_logits, rec_logits, labels, loss_mask, teacher_only=teaching)

    def recycle_activation_checkpointing(self):
        if self.recycle is not None:
            self.recycle.activation_checkpointing = self.activation_checkpointing

    def _base_autocast(self, device: torch.device):
        # A frozen base is only a teacher: on a CPU with bf16 matrix units its forward is ~1.8x faster in bf16
        # (benchmarks/module_training.py), and its states and distribution change by bf16 rounding only.
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.base_bf16 else nullcontext()

    def freeze_base(self, bf16: bool = False, module_bf16: bool = False):
        """Only the module trains: the base (embedding, layers, final norm, LM head) stops receiving updates;
        bf16: its forward runs in bf16 (recycle.base_bf16). Training steps then run the base as a teacher only
        (model/frozen_base.py): no lm_loss, the teacher's logits over the draft vocabulary only. module_bf16: the
        module's training steps run under bf16 autocast (recycle.module_bf16; fp32 weights and optimizer)."""
        self.detach_base, self.base_bf16 = True, bf16
        self.frozen = FrozenBase(bf16, module_bf16=module_bf16)
        for name, p in self.named_parameters():
            if not name.startswith("recycle."):
                p.requires_grad_(False)

    # -------------------------------------------------------------------------------------- decoding
    def new_caches(self, batch: int, max_len: int, dtype=None, device=None) -> tuple[KVCache, KVCache | None]:
        """One KV cache for the full model, one for the module (None for a plain LM)."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        kv = self.cfg.num_kv_heads // self.spec.tp_size
        base = KVCache(self.cfg.num_layers, batch, kv, max_len, self.cfg.head_dim, dtype, device)
        module = None
        if self.recycle is not None:
            module = KVCache(self.cfg.recycle_layers, batch, kv, max_len, self.cfg.head_dim, dtype, device)
        return base, module

    def base_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.hidden(input_ids, cache.positions, cache)

    def tree_step(self, input_ids: torch.Tensor, cache: KVCache, parents: list[int]) -> torch.Tensor:
        """base_step over a tree of new tokens (tree attention, as Medusa and EAGLE-2 verify): token j's parent is
        new token parents[j] (-1: the last cached one); it sits one position after its parent and attends to the
        cache and its own ancestors only. Writes slots length .. length+T-1 in token order (the caller keeps one
        branch: KVCache.move_slot, rollback). One cache length for all rows."""
        depth = tree_depths(parents)
        past, T = cache.length, len(parents)
        see = torch.zeros(T, past + T, dtype=torch.bool, device=input_ids.device)
        see[:, :past] = True
        for j, parent in enumerate(parents):
            see[j, past + j] = True
            if parent >= 0:
                see[j, past:past + T] |= see[parent, past:past + T]
        x = self.embedding(input_ids)
        cos, sin = self.rotary.at([past + d for d in depth])
        cache.step_mask = see[None, None]
        try:
            x = run_stack(self.layers, x, cos, sin, cache, False)
        finally:
            cache.step_mask = None
        return self.final_norm(x)

    def module_step(self, h: torch.Tensor, next_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.recycle_hidden(h, next_ids, cache.positions, cache)

    def draft_step(self, state: torch.Tensor, next_ids: torch.Tensor, cache: KVCache | None = None,
                   start_pos: int | None = None) -> torch.Tensor:
        """One depth of the module: `state` is h (depth 1) or the previous depth's g, `next_ids` the tokens
        that follow (x_{i+j} at depth j); returns the next depth's g. With a cache (one per depth), positions
        start at cache.length. Training (`forward` via RecyclableModule.unroll) runs the same step; decoding
        (inference/drafting.py) keeps one cache per depth. The convention is spelled out in model/recycle.py."""
        if start_pos is None:
            start_pos = cache.positions if cache is not None else 0
        return self.recycle_hidden(state, next_ids, start_pos, cache)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits for h or g (gathered across tensor-parallel ranks)."""
        return self.spec.gather_vocab(self.lm_head(states))
