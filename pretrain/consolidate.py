"""One full, unsharded state dict (our key names, fp32) from a DeepSpeed checkpoint tag, on one process.

Any layout training writes (plain, ZeRO 1/2/3, TP, PP and their combinations) is read by
parallel.ds_checkpoint.training_state, which prefers the optimizer's fp32 master weights over a bf16 module copy.
"""
from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig


def consolidated_state_dict(tag_dir: Path, cfg: ModelConfig) -> dict:
    from parallel.ds_checkpoint import training_state

    tag_dir = Path(tag_dir)
    if not any(tag_dir.glob("*model_states.pt")):
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states (*model_states.pt)")
    return training_state(tag_dir, cfg).weights
