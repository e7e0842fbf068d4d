"""Weights into a rank's parameters, before DeepSpeed takes the module: the seeded reference weights
(`init_state_dict`, `load_init`: exactly those of `torch.manual_seed(seed); RecycleGPT(cfg)`, one tensor at a
time, so a 7B rank never holds the full model) or a one-device state dict (`load_full_state`), cut to this
rank's TP shard and pipeline stage with the rules of parallel/layout.py.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import nn

from model.config import ModelConfig
from model.gpt import RecycleGPT, init_parameter
from parallel.layout import shard_state_dict, shard_tensor, tp_layout


def init_state_dict(cfg: ModelConfig, seed: int, tp_rank: int = 0, tp_size: int = 1,
                    keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, this TP rank's shard) of the weights `torch.manual_seed(seed); RecycleGPT(cfg)` gets.

    Exactly those: it replays the random draws of the model's construction (each torch layer's own
    reset_parameters, module by module) and then `init_parameter` in parameter order, on CPU, one full
    tensor at a time, from a private generator (the global RNG is not touched). `keep(name)` skips
    yielding (not drawing) the others, e.g. the parameters of other pipeline stages.
    """
    with torch.device("meta"):
        meta = RecycleGPT(cfg)
    layout = tp_layout(cfg)
    g = torch.Generator().manual_seed(seed)       # the same stream as the global RNG after manual_seed(seed)
    for module in meta.modules():                 # construction order: each torch layer's default init
        if isinstance(module, nn.Linear):         # nn.Linear.reset_parameters (no bias in this model)
            nn.init.kaiming_uniform_(torch.empty(module.weight.shape), a=math.sqrt(5), generator=g)
        elif isinstance(module, nn.Embedding):    # nn.Embedding.reset_parameters
            nn.init.normal_(torch.empty(module.weight.shape), generator=g)
    for name, p in meta.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype)
        init_parameter(cfg, name, full, generator=g)
        if keep is not None and not keep(name):
            continue
        split = layout.get(name)
        yield name, full if split is None or tp_size == 1 else shard_tensor(full, *split, tp_rank, tp_size)


@torch.no_grad()
def load_init(params: dict[str, torch.Tensor], cfg: ModelConfig, seed: int, tp_rank: int = 0, tp_size: int = 1):
    """Copy the seeded reference weights into `params` ({full-model name: parameter}) in place."""
    missing = set(params)
    for name, value in init_state_dict(cfg, seed, tp_rank, tp_size, keep=lambda n: n in params):
        target = params[name]
        if target.shape != value.shape:
            raise ValueError(f"{name}: this rank holds {tuple(target.shape)} but TP rank {tp_rank}/{tp_size} of the "
                             f"reference is {tuple(value.shape)}")
        target.copy_(value)
        missing.discard(name)
    if missing:
        raise ValueError(f"parameters with no reference weight: {sorted(missing)[:5]}")


def full_named_parameters(module: nn.Module):
    """(one-device name, parameter) of this rank: RecycleGPT as is, a RecyclePipe through its prefixes."""
    if hasattr(module, "full_named_parameters"):
        return list(module.full_named_parameters())
    return list(module.named_parameters())


@torch.no_grad()
def load_full_state(module: nn.Module, full_sd: dict, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1):
    """Copy a one-device state dict into this rank's parameters (TP shard, PP stage). Before
    deepspeed.initialize: under ZeRO-3 parameters are partitioned afterwards."""
    params = dict(full_named_parameters(module))
    missing = sorted(set(params) - set(full_sd))
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} parameter(s) this rank needs, e.g. {missing[:3]}")
    shard = shard_state_dict({k: full_sd[k] for k in params}, cfg, tp_rank, tp_size)
    for name, p in params.items():
        if p.shape != shard[name].shape:
            raise ValueError(f"{name}: rank holds {tuple(p.shape)}, state dict gives {tuple(shard[name].shape)} "
                             f"for TP rank {tp_rank}/{tp_size}; is it from a model with another config?")
        p.copy_(shard[name])


def local_state(module: nn.Module) -> dict:
    """This rank's parameters under one-device names (TP shards as they are), detached, on CPU."""
    return {k: p.detach().cpu().clone() for k, p in full_named_parameters(module)}
