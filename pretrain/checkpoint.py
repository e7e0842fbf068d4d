"""Checkpoints: DeepSpeed tags `step_N` under RUN_DIR/checkpoints plus our metadata.

`latest` is written by rank 0 only after a barrier, i.e. after every rank has finished writing, and via
a temporary file + rename, so a crash mid-save leaves the previous `latest` pointing at a complete tag.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(state: dict | None):
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save(engine, run_dir: Path, step: int, consumed_samples: int, meta: dict, keep_last: int):
    ckpt_dir = checkpoint_dir(run_dir)
    tag = f"step_{step}"
    from parallel.ds_checkpoint import OPTIMIZER_NAMES_KEY
    from parallel.engine_state import optimizer_param_names
    client = {"step": step, "consumed_samples": consumed_samples, "rng": rng_state(),
              OPTIMIZER_NAMES_KEY: optimizer_param_names(engine)}   # so a reshard never guesses the order
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    _barrier()  # every rank has written its shards before `latest` may point here
    if _is_rank0():
        (ckpt_dir / tag / "recyclegpt.json").write_text(json.dumps({**meta, "step": step,
                                                                     "consumed_samples": consumed_samples}))
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
        prune(ckpt_dir, keep_last)
    _barrier()


def prune(ckpt_dir: Path, keep_last: int):
    """Delete all but the newest `keep_last` tags; never the one `latest` names."""
    current = latest_tag(ckpt_dir)
    tags = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir())
    for _, path in tags[:-keep_last]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def layout_meta(engine) -> dict:
    """The layout a checkpoint is written under, for recyclegpt.json ("layout")."""
    from pretrain.relayout import current_layout
    return current_layout(engine).to_dict()


def load(engine, ckpt_dir: Path) -> dict | None:
    """Resume from `latest` if there is one; returns the client state (step, consumed_samples) or None.

    Same layout (tp, pp, dp, ZeRO stage) as the run that saved it: DeepSpeed's load_checkpoint, exact.
    Another layout: pretrain.relayout reshards weights and Adam moments into this engine and restores the
    LR schedule and counters (DeepSpeed refuses ZeRO partitions under another dp, and TP/PP files differ)."""
    from pretrain.relayout import current_layout, load_resharded, saved_layout

    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    saved, now = saved_layout(Path(ckpt_dir) / tag), current_layout(engine)
    if saved != now:
        client = load_resharded(engine, Path(ckpt_dir) / tag, saved, now)
    else:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {ckpt_dir}/{tag}; move the run directory aside to start "
                               "fresh")
    restore_rng_state(client.get("rng"))
    return client


def load_for_inference(run_dir: str | Path, device: str | torch.device = "cpu", dtype=None):
    """(model, tokenizer) from a run directory's `latest` checkpoint (or, before any, the weights pretrain.import_hf
    put in init/), on one device, no process group."""
    from transformers import AutoTokenizer

    from model import RecycleGPT
    from pretrain.config import load_config
    from pretrain.consolidate import consolidated_state_dict

    run_dir = Path(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"))
    model_cfg = cfg.model.build()
    tag = latest_tag(checkpoint_dir(run_dir))
    init = run_dir / "init" / "model.safetensors"       # pretrain.import_hf's start weights, before training
    if tag is None and init.is_file():
        from safetensors.torch import load_file
        state = load_file(str(init))
    elif tag is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint (checkpoints/latest); train first with "
                                f"python -m pretrain.train --config ... run.dir={run_dir}")
    else:
        state = consolidated_state_dict(checkpoint_dir(run_dir) / tag, model_cfg)
    model = RecycleGPT(model_cfg)
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    return model, tokenizer
