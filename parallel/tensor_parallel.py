"""Tensor parallelism: the megatron-core layer spec, and the shard maps that keep weights identical.

`TensorParallelSpec` has the methods of `model.spec.LocalSpec` and returns megatron-core
`ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding` (CPU-initialised, so they run on
gloo; DESIGN.md §2b). The model code does not change: under TP a rank simply holds fewer heads.

Weights never come from megatron's initialisers. The one-device model built with a seed is the
reference, and every layout (TP, PP, both) receives exactly its weights through pure functions:

    full state dict  --shard_state_dict-->  rank's state dict  --unshard_state_dicts-->  full state dict

`tp_layout(cfg)` says which parameters are split and along which dim (fused ones per block: a rank holds
[Q_r; K_r; V_r] of linear_qkv and [gate_r; up_r] of linear_fc1). `init_state_dict` reproduces
`torch.manual_seed(seed); RecycleGPT(cfg)` parameter by parameter, so a 7B rank never holds the full model.
The same functions reshard checkpoints (TP=2 -> TP=1 and back).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.gpt import RecycleGPT
# The shard maps and the seeded init live in parallel/layout.py and parallel/weights.py; re-exported for callers.
from parallel.layout import shard_state_dict, shard_tensor, tp_layout, unshard_state_dicts, unshard_tensor  # noqa: F401
from parallel.weights import init_state_dict, load_full_state, load_init  # noqa: F401

# --------------------------------------------------------------------------- megatron-core layers


def _no_init(weight):   # weights come from init_state_dict / checkpoints, never from megatron's initialisers
    return None


def model_parallel_config(tp_size: int, params_dtype=torch.float32):
    from megatron.core import ModelParallelConfig
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=params_dtype,
                               sequence_parallel=False, gradient_accumulation_fusion=False)


def _plain_state_dict(cls):
    """Megatron's linears add an `_extra_state` key (and a pre-hook expecting it); drop both so a TP layer
    has exactly nn.Linear's keys and checkpoints map 1:1."""
    cls.get_extra_state = nn.Module.get_extra_state
    cls.set_extra_state = nn.Module.set_extra_state
    return cls


@functools.cache
def _megatron_layers():
    from megatron.core import tensor_parallel as mtp

    @_plain_state_dict
    class ColumnLinear(mtp.ColumnParallelLinear):
        def __init__(self, in_features, out_features, config):
            super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=False,
                             gather_output=False)
            self._load_state_dict_pre_hooks.clear()

        def forward(self, x):             # megatron returns (output, bias)
            return super().forward(x)[0]

    @_plain_state_dict
    class RowLinear(mtp.RowParallelLinear):
        def __init__(self, in_features, out_features, config):
            super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=False,
                             input_is_parallel=True, skip_bias_add=False)
            self._load_state_dict_pre_hooks.clear()

        def forward(self, x):
            return super().forward(x)[0]

    return ColumnLinear, RowLinear, mtp.VocabParallelEmbedding


def _mark(weight: nn.Parameter, dim: int):
    # Megatron's attributes (its CPU initialiser would set them; we skip that initialiser).
    weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, dim, 1


class TensorParallelSpec:
    """`LocalSpec`'s methods backed by megatron-core; needs `parallel.setup.init_distributed` first."""

    def __init__(self, tp_size: int | None = None, params_dtype=torch.float32):
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("TensorParallelSpec needs the process groups: call parallel.setup.init_distributed")
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.group = ps.get_tensor_model_parallel_group()
        if tp_size is not None and tp_size != self.tp_size:
            raise ValueError(f"tp_size={tp_size} but the process groups were built with tp={self.tp_size}")
        self.config = model_parallel_config(self.tp_size, params_dtype)
        self._column, self._row, self._embedding = _megatron_layers()

    def _check(self, what: str, size: int):
        if size % self.tp_size:
            raise ValueError(f"{what}={size} is not divisible by parallel.tp={self.tp_size}")

    def column_linear(self, in_features: int, out_features: int, fused_sizes=None) -> nn.Module:
        for s in fused_sizes or (out_features,):
            self._check("column_linear block", s)
        layer = self._column(in_features, out_features, self.config)
        _mark(layer.weight, 0)
        return layer

    def row_linear(self, in_features: int, out_features: int) -> nn.Module:
        self._check("row_linear input size", in_features)
        layer = self._row(in_features, out_features, self.config)
        _mark(layer.weight, 1)
        return layer

    def replicated_linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        self._check("vocab_size", vocab_size)
        layer = self._embedding(vocab_size, dim, init_method=_no_init, config=self.config)
        _mark(layer.weight, 0)
        return layer

    def lm_head(self, dim: int, vocab_size: int) -> nn.Module:
        self._check("vocab_size", vocab_size)
        return self.column_linear(dim, vocab_size)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token loss over the vocabulary shards. megatron works in place on fp32 logits and views them
        2-D, hence contiguous; the model does not reuse its logits after the loss."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        return vocab_parallel_cross_entropy(logits.float().contiguous(), target.contiguous())

    def kl_to_teacher(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Per-token KL(softmax(teacher) || softmax(logits)) over the vocabulary shards (LocalSpec's, reduced
        over the TP group); the gradient to this rank's logits is its shard of q - p."""
        return _VocabParallelKL.apply(logits, teacher_logits.detach(), self.group)

    @torch.no_grad()
    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits for decoding (torch.distributed: megatron's gather allocates on CUDA)."""
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def _vocab_log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the full vocabulary from this rank's shard (fp32, no autograd)."""
    logits = logits.float()
    top = logits.max(-1, keepdim=True).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - top
    sum_exp = shifted.exp().sum(-1, keepdim=True)
    dist.all_reduce(sum_exp, group=group)
    return shifted - sum_exp.log()


class _VocabParallelKL(torch.autograd.Function):
    # A hand-written backward, as megatron's vocab_parallel_cross_entropy has: an all-reduce inside autograd
    # would give each rank only its own shard's share of the normaliser's gradient.
    @staticmethod
    def forward(ctx, logits, teacher_logits, group):
        log_q = _vocab_log_softmax(logits, group)
        log_p = _vocab_log_softmax(teacher_logits, group)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)
        dist.all_reduce(kl, group=group)
        ctx.save_for_backward(log_q, p)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        log_q, p = ctx.saved_tensors
        return (log_q.exp() - p) * grad_kl.unsqueeze(-1), None, None


def mark_replicated(module: nn.Module, tp_rank: int):
    """DeepSpeed counts a gradient in the global norm on model-parallel rank 0 or when the parameter is
    model-parallel. Under PP that skips replicated parameters (norms, W_proj) of later stages; marking
    them `model_parallel` on TP rank 0 only makes every parameter count exactly once."""
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = tp_rank == 0


def build_tp_model(cfg: ModelConfig, seed: int, spec=None, state: dict | None = None) -> RecycleGPT:
    """The model on this rank (TP shards when tp > 1) with the weights of `manual_seed(seed); RecycleGPT(cfg)`,
    or of `state` (a one-device state dict, e.g. an imported checkpoint) when given."""
    from model.spec import LocalSpec
    spec = spec or LocalSpec()
    model = RecycleGPT(cfg, spec)
    if state is not None:
        load_full_state(model, state, cfg, spec.tp_rank, spec.tp_size)
    else:
        load_init(dict(model.named_parameters()), cfg, seed, spec.tp_rank, spec.tp_size)
    mark_replicated(model, spec.tp_rank)
    return model
