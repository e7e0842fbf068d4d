"""Resume a checkpoint under another parallel layout (tp, pp, dp, ZeRO stage) than the one that wrote it.

DeepSpeed's `load_checkpoint` is exact when the layout is unchanged, and refuses or misreads the files
otherwise (ZeRO 1/2/3 partitions are per dp rank, TP and pipeline files per model-parallel rank). So
`pretrain.checkpoint.load` compares the saved layout (`recyclegpt.json` "layout"; for tags written before
it was recorded, DeepSpeed's own fields in the model-states files) with the running one, and on a change:

1. every rank reads, from the files of every rank that wrote the tag, the fp32 weights and Adam moments of
   the parameters *it* holds now, as one device would hold them (`parallel.ds_checkpoint.training_state`);
2. it cuts its TP shard out of them and puts weights, fp32 master copies and moments into the freshly
   built engine (`parallel.engine_state.load_training_state`: ZeRO-3 parameters through GatheredParameters,
   ZeRO 1/2 partitions through DeepSpeed's fragment mappings);
3. the LR scheduler, DeepSpeed's step/sample counters, our client state (step, consumed samples) and the RNG
   come from the tag as `load_checkpoint` would restore them, so the data stream and the schedule continue.

With fp32 training the continued run matches the uninterrupted one to reduction order. When the tag's
optimizer state is in a shape the readers do not know, the weights are still resharded and Adam starts
with fresh moments; the log line says which happened.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parallel.setup import any_rank

log = logging.getLogger("recyclegpt.train")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage}"

    def to_dict(self) -> dict:
        return asdict(self)


def current_layout(engine) -> Layout:
    from parallel.setup import current
    dims = current().dims
    return Layout(dims.tp, dims.pp, dims.dp, int(engine.zero_optimization_stage()))


def _meta(tag_dir: Path) -> dict:
    path = Path(tag_dir) / "recyclegpt.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def saved_layout(tag_dir: Path) -> Layout:
    recorded = _meta(tag_dir).get("layout")
    if recorded:
        return Layout(**{k: int(recorded[k]) for k in ("tp", "pp", "dp", "zero_stage")})
    from parallel.ds_checkpoint import checkpoint_layout
    return Layout(**checkpoint_layout(tag_dir))


def _model_config(engine, tag_dir: Path):
    from model.config import ModelConfig
    ours = getattr(engine.module, "cfg", None)
    saved = _meta(tag_dir).get("model")
    if saved is None:
        if ours is None:
            raise ValueError(f"{tag_dir} has no recyclegpt.json and the engine's module no model config")
        return ours
    saved = ModelConfig.from_dict(saved)
    if ours is not None and ours != saved:
        diff = {k: (v, getattr(ours, k)) for k, v in saved.to_dict().items() if getattr(ours, k) != v}
        raise ValueError(f"{tag_dir} was saved from another model (saved vs now: {diff}); a layout change keeps "
                         "the model config")
    return saved


@torch.no_grad()
def load_resharded(engine, tag_dir: Path, saved: Layout, now: Layout) -> dict:
    """Load tag `tag_dir` (written under `saved`) into `engine` (built under `now`) on every rank; returns the
    client state (step, consumed_samples, rng) as `engine.load_checkpoint` would."""
    from parallel.ds_checkpoint import _load_ds, _model_states_path, training_state
    from parallel.engine_state import load_training_state
    from parallel.weights import full_named_parameters
    from parallel.setup import current

    tag_dir = Path(tag_dir)
    error = None
    try:
        cfg = _model_config(engine, tag_dir)
        mine = {name for name, _ in full_named_parameters(engine.module)}
        state = training_state(tag_dir, cfg, keep=mine, tp_rank=current().tp_rank, tp_size=now.tp)
        moments = load_training_state(engine, state, cfg, current().tp_rank, now.tp)
        ds_states = _load_ds(_model_states_path(tag_dir, 0))
    except Exception as e:                     # every rank raises together instead of the others hanging
        error = e
    if any_rank(error is not None):
        raise RuntimeError(f"could not load {tag_dir} (saved with {saved}) under {now}") from error

    sched = engine.lr_scheduler
    if sched is not None and ds_states.get("lr_scheduler") is not None:
        sched.load_state_dict(ds_states["lr_scheduler"])
        lrs = sched.get_last_lr()                # what the optimizer's groups held when the tag was saved
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
    engine.global_steps = int(ds_states.get("global_steps", 0))
    engine.global_samples = int(ds_states.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(ds_states.get("skipped_steps", 0))
    moments_note = "resharded" if moments else \
        "re-initialised (the checkpoint's optimizer state could not be read; Adam restarts its moments)"
    log.info("resuming %s saved with %s under %s: weights resharded, optimizer moments %s",
             tag_dir.name, saved, now, moments_note)
    return {k: ds_states[k] for k in ("step", "consumed_samples", "rng") if k in ds_states}
