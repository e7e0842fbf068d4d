"""Between layouts: one-device ("full") state dicts <-> this rank's TP/PP parameters and checkpoint files.

Every function speaks the one-device model's key names (`RecycleGPT.state_dict()`), so a checkpoint
written under any (tp, pp) layout can be read back as one state dict, and one state dict can be loaded
into any layout. The split rules are `parallel.tensor_parallel.tp_layout`; the pipeline's layer index ->
name prefix map is `parallel.pipeline.layer_prefixes`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from parallel.tensor_parallel import shard_state_dict, unshard_state_dicts

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


def full_named_parameters(module: nn.Module):
    """(one-device name, parameter) of this rank: RecycleGPT as is, a RecyclePipe through its prefixes."""
    if hasattr(module, "full_named_parameters"):
        return list(module.full_named_parameters())
    return list(module.named_parameters())


def expected_keys(cfg: ModelConfig) -> set[str]:
    from model.gpt import RecycleGPT
    with torch.device("meta"):
        return set(RecycleGPT(cfg).state_dict().keys())


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


def pipeline_state_dict(tag_dir: str | Path, cfg: ModelConfig) -> dict:
    """The full fp32 state dict from a DeepSpeed pipeline checkpoint tag (`layer_XX-model_YY-model_states.pt`:
    XX the pipeline layer, YY the TP rank)."""
    from parallel.pipeline import layer_prefixes

    tag_dir = Path(tag_dir)
    prefixes = layer_prefixes(cfg)
    per_tp: dict[int, dict] = {}
    for path in sorted(tag_dir.glob("layer_*-model_states.pt")):
        m = _LAYER_FILE.search(path.name)
        if not m:
            raise ValueError(f"unexpected pipeline checkpoint file {path.name} in {tag_dir}")
        layer, tp_rank = int(m.group(1)), int(m.group(2))
        if layer >= len(prefixes) or prefixes[layer] is None:
            raise ValueError(f"{path.name}: layer {layer} does not exist in a pipeline of this model config "
                             f"({len(prefixes)} layers); is the checkpoint from another model?")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        per_tp.setdefault(tp_rank, {}).update({prefixes[layer] + k: v.float() for k, v in sd.items()})
    if not per_tp:
        raise FileNotFoundError(f"{tag_dir} holds no pipeline layer files (layer_*-model_*-model_states.pt)")
    ranks = sorted(per_tp)
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{tag_dir}: TP ranks {ranks} are incomplete")
    full = unshard_state_dicts([per_tp[r] for r in ranks], cfg)
    want = expected_keys(cfg)
    if set(full) != want:
        diff = sorted(set(full) ^ want)[:3]
        raise ValueError(f"{tag_dir}: the layer files do not make a whole model (differs in e.g. {diff})")
    return full
