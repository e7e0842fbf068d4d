"""The DeepSpeed JSON, derived in one place from the run's numbers (DESIGN.md §2b, §8).

The caller passes plain values (so this module does not depend on the trainer's config classes); a
user's own DeepSpeed JSON (a dict or a path) is merged over the derived one, key by key. The merged result
is checked again, so a user file cannot silently break the batch arithmetic or the ZeRO/pipeline rule.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from parallel.dims import ParallelDims, check_precision, check_zero


def use_bf16(precision: str = "auto") -> bool:
    """auto: bf16 on a GPU, fp32 on a CPU (CPU bf16 matmuls are slow and DeepSpeed's CPU path is fp32)."""
    check_precision(precision)
    if precision == "auto":
        return torch.cuda.is_available()
    if precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("train.precision=bf16 needs a GPU; use train.precision=fp32 (or auto) on a CPU")
    return precision == "bf16"


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge; `extra` wins."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(dims: ParallelDims, *, micro_batch: int, global_batch: int, grad_clip: float = 1.0,
                     zero_stage: int = 0, precision: str = "auto", optimizer: dict | None = None,
                     scheduler: dict | None = None, user_config: dict | str | Path | None = None,
                     steps_per_print: int = 10 ** 9) -> dict:
    """The DeepSpeed config dict.

    optimizer / scheduler: DeepSpeed's own JSON sections ({"type": "AdamW", "params": {...}}), only when
    DeepSpeed should build them; `parallel.engine.build_engine` normally gets them from the caller as
    factories instead. On a CPU a JSON AdamW gets `torch_adam: true` (DeepSpeed's fused Adam is CUDA-only).
    """
    check_zero(zero_stage, dims.pp)
    accumulation = dims.grad_accumulation(global_batch, micro_batch)
    bf16 = use_bf16(precision)
    ds = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,   # a torch AdamW from the caller; DeepSpeed vouches only for its own
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": steps_per_print,      # the trainer logs itself
        "wall_clock_breakdown": False,
    }
    if bf16 and dims.pp > 1 and zero_stage == 1:
        # Pipeline + bf16 + ZeRO-1: DeepSpeed's BF16 optimizer (fp32 master weights) accumulating gradients in
        # fp32, as Megatron-DeepSpeed runs it. (With ZeRO 0 DeepSpeed accepts only bf16 accumulation.)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if optimizer is not None:
        optimizer = json.loads(json.dumps(optimizer))
        if not torch.cuda.is_available() and optimizer.get("type", "").lower() in ("adam", "adamw"):
            optimizer.setdefault("params", {}).setdefault("torch_adam", True)
        ds["optimizer"] = optimizer
    if scheduler is not None:
        ds["scheduler"] = scheduler
    if user_config:
        if not isinstance(user_config, dict):
            path = Path(user_config)
            if not path.is_file():
                raise ValueError(f"parallel.deepspeed_config={path} does not exist")
            try:
                user_config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"parallel.deepspeed_config={path} is not valid JSON: {e}") from None
        ds = merge(ds, user_config)
        check_merged(ds, dims)
    return ds


def check_merged(ds: dict, dims: ParallelDims):
    """A user's JSON may change anything, but the three batch numbers must still agree with dp."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    check_zero(stage, dims.pp)
    tb, mb, ga = (ds.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                      "gradient_accumulation_steps"))
    if tb != mb * ga * dims.dp:
        raise ValueError(f"DeepSpeed config: train_batch_size={tb} != train_micro_batch_size_per_gpu={mb} x "
                         f"gradient_accumulation_steps={ga} x dp={dims.dp}; set train.global_batch_size="
                         f"{mb * ga * dims.dp} or drop the batch keys from the user JSON")
