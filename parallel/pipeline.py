"""The DeepSpeed pipeline: RecycleGPT as a flat list of LayerSpecs (DESIGN.md §2b).

    0            TiedLayerSpec('embed')  (input_ids, labels)        -> (x, labels)
    1 .. L       DecoderLayerPipe        (x, labels)                -> (x, labels)
    L+1          FinalNormPipe           (x, labels)                -> (h, labels)
    L+2          TiedLayerSpec('embed')  (h, labels)                -> (h, labels, E[labels])
    L+3          HeadPipe                (h, labels, E[labels])     -> (lm_logits, rec_logits per depth...)
    loss_fn      model.objective.RecycleObjective on the last stage (the one-device model's objective)

The token ids travel with the activations (ints get no gradient in DeepSpeed's p2p), so the last stage
has x_{i+1} for the recyclable module's E[x_{i+1}]. The embedding is tied between the first and the last
stage; DeepSpeed all-reduces the tied gradient, so E gets the sum of the input-embedding and the module's
contributions, as on one device. The final norm, LM head and module always sit on the last stage; the
module's layers (and the LM head's cost) count toward that stage's share when the decoder layers are split.

The layers are the model's own classes (DecoderLayer, RMSNorm, RecyclableModule, Rotary); no model math
is repeated here. Under TP the spec gives each stage megatron-core layers.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.objective import LossOutput, RecycleObjective
from model.layers import DecoderLayer, RMSNorm, Rotary
from model.recycle import RecyclableModule
from parallel.dims import check_detach_base
from parallel.layout import full_name, layer_prefixes, stage_layer_counts, stage_parts  # noqa: F401  (re-exported)
from parallel.tensor_parallel import mark_replicated
from parallel.weights import load_init


@functools.cache
def _rotary(head_dim: int, max_positions: int, theta: float, scaling: tuple, device: str) -> Rotary:
    # One cos/sin table per process and device, shared by every layer of the stage (not a parameter).
    return Rotary(head_dim, max_positions, theta, scaling).to(device)


def rotary_for(cfg: ModelConfig, device: torch.device) -> Rotary:
    return _rotary(cfg.head_dim, cfg.max_seq_len + 2, cfg.rope_theta, cfg.rope_scaling_args, str(device))


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, spec):
        super().__init__()
        self.embedding = spec.embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, inputs):
        input_ids, labels = inputs
        return self.embedding(input_ids), labels


def next_token_embeddings(embed: EmbeddingPipe, inputs):
    """The tied embedding's second use, on the last stage: E[x_{i+1}] for the recyclable module."""
    h, labels = inputs
    return h, labels, embed.embedding(labels)


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, cfg: ModelConfig, spec, activation_checkpointing: bool = False):
        super().__init__(cfg, spec)
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing

    def forward(self, inputs):
        x, labels = inputs
        cos, sin = rotary_for(self.cfg, x.device)(0, x.shape[1])
        if self.activation_checkpointing and self.training:
            x = checkpoint(super().forward, x, cos, sin, use_reentrant=False)
        else:
            x = super().forward(x, cos, sin)
        return x, labels


class FinalNormPipe(RMSNorm):
    def forward(self, inputs):
        x, labels = inputs
        return super().forward(x), labels


class HeadPipe(nn.Module):
    """LM head and recyclable module (RecycleGPT.forward after `hidden`)."""

    def __init__(self, cfg: ModelConfig, spec, detach_base: bool = False, activation_checkpointing: bool = False,
                 objective: RecycleObjective = RecycleObjective()):
        super().__init__()
        self.cfg, self.detach_base, self.objective = cfg, detach_base, objective
        self.lm_head = spec.lm_head(cfg.hidden_size, cfg.vocab_size)
        self.recycle = RecyclableModule(cfg, spec) if cfg.recycle_layers else None
        if self.recycle is not None:
            self.recycle.activation_checkpointing = activation_checkpointing

    def forward(self, inputs):
        if self.recycle is None:
            h, _ = inputs
            return self.lm_head(h)
        h, _, next_embeds = inputs
        states = self.recycle.unroll(h.detach() if self.detach_base else h, next_embeds,
                                     rotary_for(self.cfg, h.device), self.objective.depth)
        return (self.lm_head(h), *(self.objective.module_logits(self.lm_head, g) for g in states))


def layer_specs(cfg: ModelConfig, spec, detach_base: bool = False, activation_checkpointing: bool = False,
                objective: RecycleObjective = RecycleObjective()):
    specs = [TiedLayerSpec("embed", EmbeddingPipe, cfg, spec, tied_weight_attr=["embedding.weight"])]
    specs += [LayerSpec(DecoderLayerPipe, cfg, spec, activation_checkpointing) for _ in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalNormPipe, cfg.hidden_size, cfg.norm_eps))
    if cfg.recycle_layers:
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, cfg, spec, forward_fn=next_token_embeddings,
                                   tied_weight_attr=["embedding.weight"]))
    specs.append(LayerSpec(HeadPipe, cfg, spec, detach_base, activation_checkpointing, objective))
    return specs


class RecyclePipe(PipelineModule):
    """PipelineModule with our partitioning, loss, weight init and logged partial losses."""

    def __init__(self, cfg: ModelConfig, spec, topology, seed: int | None = None,
                 objective: RecycleObjective = RecycleObjective(), detach_base: bool = False,
                 activation_checkpointing: bool = False):
        check_detach_base(detach_base, topology.get_dim("pipe"))
        self.cfg, self.spec, self.objective = cfg, spec, objective
        self._parts = stage_parts(cfg, topology.get_dim("pipe"))
        self._losses = None
        self.loss_sums, self.loss_count = None, 0
        super().__init__(layers=layer_specs(cfg, spec, detach_base, activation_checkpointing, objective),
                         topology=topology,
                         loss_fn=self._loss, partition_method="recycle", activation_checkpoint_interval=0)
        if seed is not None:
            load_init(dict(self.full_named_parameters()), cfg, seed, spec.tp_rank, spec.tp_size)
        mark_replicated(self, spec.tp_rank)
        for p in self.parameters():
            if getattr(p, "ds_pipe_replicated", False):
                # The last stage's copy of the tied embedding: DeepSpeed's fp32 gradient clipping ignores
                # ds_pipe_replicated and would count it twice; not model-parallel here = counted once (stage 0).
                p.tensor_model_parallel = p.model_parallel = False

    def _synchronize_tied_weights(self):
        # DeepSpeed broadcasts the tied weight in place; outside no_grad autograd records the broadcast
        # into the parameter's history (and warns in backward).
        with torch.no_grad():
            super()._synchronize_tied_weights()

    def _partition_layers(self, method="recycle"):
        self.parts = list(self._parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def full_named_parameters(self):
        """(one-device model name, parameter) for this rank's parameters; the tied embedding once."""
        prefixes = layer_prefixes(self.cfg)
        seen = set()
        for name, p in self.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield full_name(name, prefixes), p

    def _loss(self, outputs, targets):
        labels, loss_mask = targets
        lm_logits, *rec_logits = outputs if isinstance(outputs, tuple) else (outputs,)
        out = self.objective(self.spec, lm_logits, rec_logits, labels, loss_mask)
        self._losses = OrderedDict((k, v.detach()) for k, v in out.named().items() if k != "loss" and v is not None)
        sums = out.vector()
        self.loss_sums = sums if self.loss_sums is None else self.loss_sums + sums
        self.loss_count += 1
        return out.loss

    def reset_loss_sums(self):
        """Running LossOutput.vector() sums over micro-batches on the last stage, for eval_batch (DeepSpeed
        reduces only the total loss there)."""
        self.loss_sums, self.loss_count = None, 0

    def get_additional_losses(self):
        """DeepSpeed averages these over micro-batches and dp and broadcasts them along the pipe (every
        stage must name the same keys, hence zeros before the first loss)."""
        if self._losses is None:
            zero = torch.zeros((), device=next(self.parameters()).device)
            return OrderedDict((n, zero.clone()) for n in self.loss_names())
        return self._losses

    def loss_names(self) -> list[str]:
        """The additional losses' names, the same on every stage."""
        if not self.cfg.recycle_layers:
            return ["lm_loss"]
        return ["lm_loss", "recycle_loss"] + [f"recycle_loss_d{j}" for j in range(2, self.objective.depth + 1)]


def pipe_batch(input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None):
    """One micro-batch as DeepSpeed's pipeline reads it: (first-stage inputs, last-stage targets)."""
    if loss_mask is None:
        loss_mask = torch.ones_like(labels, dtype=torch.float32)
    return (input_ids, labels), (labels, loss_mask.float())


class PipeBatches:
    """Wrap an iterator of {'tokens', 'labels', 'loss_mask'} dicts (the trainer's micro-batches)."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.batches)
        return pipe_batch(b["tokens"], b["labels"], b.get("loss_mask"))


def pipe_losses(engine) -> LossOutput:
    """The last train_batch's (total, lm, recycle) losses: means over micro-batches and dp, on every rank."""
    extra = engine.agg_additional_losses or {}
    deeper = tuple(extra[n] for n in engine.module.loss_names()[2:])
    return LossOutput(engine.agg_train_loss, extra.get("lm_loss"), extra.get("recycle_loss"), deeper)
