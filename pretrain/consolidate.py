"""One full, unsharded state dict (our key names, fp32) from a DeepSpeed checkpoint tag, on one process.

Handles the layouts training writes: plain and ZeRO 1/2 (`mp_rank_XX_model_states.pt` holds the module),
ZeRO 3 (parameters live in the optimizer shards; DeepSpeed's zero_to_fp32 reassembles them).
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig


def _load(path: Path) -> dict:
    # DeepSpeed's model-state files hold plain containers, tensors and numbers besides the weights.
    return torch.load(path, map_location="cpu", weights_only=False)


def _strip(sd: dict) -> dict:
    return {k.removeprefix("module."): v.float() for k, v in sd.items()}


def consolidated_state_dict(tag_dir: Path, cfg: ModelConfig) -> dict:
    tag_dir = Path(tag_dir)
    mp_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if list(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")) and _is_zero3(mp_files, tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return _strip(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
    if list(tag_dir.glob("layer_*-model_*states.pt")):
        from parallel.reshard import pipeline_state_dict
        return pipeline_state_dict(tag_dir, cfg)
    if len(mp_files) > 1:
        from parallel.tensor_parallel import unshard_state_dicts
        return unshard_state_dicts([_strip(_load(f)["module"]) for f in mp_files], cfg)
    if not mp_files:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    return _strip(_load(mp_files[0])["module"])


def _is_zero3(mp_files: list[Path], tag_dir: Path) -> bool:
    if not mp_files:
        return True
    states = _load(mp_files[0])
    return int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)) == 3
