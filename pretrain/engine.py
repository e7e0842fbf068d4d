"""Process group start-up and the DeepSpeed engine for a run.

The DeepSpeed JSON is derived from the run config here, in one place; a user's own JSON
(`parallel.deepspeed_config`) is merged over it.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from pretrain.config import ConfigError, RunConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env_defaults():
    """A plain `python -m pretrain.train` has no launcher: DeepSpeed would try MPI discovery and fail."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def use_bf16(cfg: RunConfig) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    if cfg.train.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=bf16 needs a GPU; use train.precision=fp32 (or auto) on CPU")
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: RunConfig, dp: int) -> dict:
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}; "
                          f"try train.global_batch_size={t.micro_batch_size * dp * max(1, t.global_batch_size // (t.micro_batch_size * dp))}")
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,   # our torch AdamW; DeepSpeed only vouches for its own
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10 ** 9,               # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.deepspeed_config:
        path = Path(cfg.parallel.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed_config={path} does not exist")
        ds = merge(ds, json.loads(path.read_text()))
    return ds


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
