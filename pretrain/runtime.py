"""The parallel side of a run as the trainer sees it: process groups, the engine, ranks, steps, reductions.

Everything layout-specific (TP layers, the pipeline, ZeRO, the DeepSpeed JSON) lives in parallel/; this file
only turns the run config into those calls and gives the trainer one interface for every layout.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass

import torch.distributed as dist

from model.objective import LossOutput
from parallel.deepspeed_config import deepspeed_config
from parallel.dims import ParallelDims, check_detach_base
from pretrain.config import RunConfig
from pretrain.flops import throughput_row
from pretrain.optim import make_optimizer, make_scheduler

log = logging.getLogger("recyclegpt.train")


def parallel_dims(cfg: RunConfig) -> ParallelDims:
    return ParallelDims.from_config(cfg.model.build(), cfg.parallel)


def ds_config(cfg: RunConfig, dims: ParallelDims) -> dict:
    t = cfg.train
    return deepspeed_config(dims, micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                            grad_clip=t.grad_clip, zero_stage=cfg.parallel.zero_stage, precision=t.precision,
                            user_config=cfg.parallel.deepspeed_config or None)


def validate_parallel(cfg: RunConfig):
    """Checks that need no process group (the world size comes from the launcher's environment)."""
    dims = parallel_dims(cfg)
    dims.grad_accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    ds_config(cfg, dims)
    check_module_init(cfg)
    check_detach_base(cfg.recycle.detach_base, dims.pp)


@dataclass
class Runtime:
    engine: object
    ctx: object            # parallel.setup.DistContext
    cfg: RunConfig

    rank = property(lambda self: self.ctx.rank)
    world_size = property(lambda self: self.ctx.dims.world_size)
    dp_rank = property(lambda self: self.ctx.dp_rank)
    dp_size = property(lambda self: self.ctx.dims.dp)
    device = property(lambda self: self.ctx.device)
    bf16 = property(lambda self: self.engine.bfloat16_enabled())

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def train_batch(self, micro_batches: list[dict]) -> LossOutput:
        from parallel.engine import train_batch
        return train_batch(self.engine, micro_batches)

    def eval_batch(self, micro_batches: list[dict]) -> LossOutput:
        from parallel.engine import eval_batch
        return eval_batch(self.engine, micro_batches)

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def throughput(self, tokens_per_s: float) -> dict:
        return throughput_row(self.cfg.model.build(), self.cfg.train.seq_length, tokens_per_s, self.world_size)

    def shutdown(self):
        from parallel.setup import destroy
        if dist.is_initialized():
            dist.barrier()
        destroy()


def _record_fp32_grad_norm(engine):
    """DeepSpeed's plain fp32 engine clips but throws the norm away; keep it for metrics.jsonl, and hand it to
    the optimizer's non-finite check (the norm over every rank's gradients, so it needs no pass of its own)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    from pretrain.optim import SkipNonFiniteAdamW

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)
        if isinstance(engine.optimizer, SkipNonFiniteAdamW):
            engine.optimizer.clip_norm = engine._global_grad_norm
    engine.clip_fp32_gradients = clip_and_record


def imported_weights(cfg: RunConfig) -> dict | None:
    """A run made by pretrain.import_hf starts from RUN_DIR/init/model.safetensors until it has a checkpoint.
    A module the import created fresh at random is re-initialised here when the run asks for
    recycle.init=base_last_layers (so the key works in the training config as well as at import)."""
    from pretrain.checkpoint import checkpoint_dir, latest_tag

    init = cfg.run_dir / "init" / "model.safetensors"
    if not init.is_file() or latest_tag(checkpoint_dir(cfg.run_dir)) is not None:
        return None
    from safetensors.torch import load_file
    state = load_file(str(init))
    source = init.parent / "source.json"
    meta = json.loads(source.read_text()) if source.is_file() else {}
    if cfg.recycle.init == "base_last_layers" and meta.get("fresh_module") and \
            meta.get("module_init") != "base_last_layers":
        from model.recycle import init_from_base_layers
        state = init_from_base_layers(state, cfg.model.build())
    return state


def check_module_init(cfg: RunConfig):
    """recycle.init=base_last_layers copies a trained base's layers: it needs an imported RUN_DIR."""
    from pretrain.checkpoint import checkpoint_dir, latest_tag

    if cfg.recycle.init == "base_last_layers" and not (cfg.run_dir / "init" / "model.safetensors").is_file() \
            and latest_tag(checkpoint_dir(cfg.run_dir)) is None:
        raise ValueError(f"recycle.init=base_last_layers needs a trained base in {cfg.run_dir}/init; make the run "
                         "directory with python -m pretrain.import_hf --hf HF_DIR --output RUN_DIR")


def training_objective(cfg: RunConfig, writes_files: bool):
    """recycle.* as the model's RecycleObjective, with the run's draft vocabulary when recycle.draft_vocab > 0."""
    objective = cfg.recycle.objective()
    if not cfg.recycle.draft_vocab:
        return objective
    return dataclasses.replace(objective, draft_ids=run_draft_vocab(cfg, writes_files).token_ids)


def run_draft_vocab(cfg: RunConfig, writes_files: bool):
    """RUN_DIR/draft_vocab.safetensors: the recycle.draft_vocab most frequent tokens of the training shards,
    counted once (every rank counts the same; rank 0 writes) and read back on resume, so a module keeps the
    rows it was trained over. Decoding picks the file up from the run directory (inference/draft_vocab.py)."""
    from data_prep.datasets import parse_blend
    from data_prep.token_counts import count_tokens
    from model.draft_vocab import FILE_NAME, DraftVocab

    vocab = saved_draft_vocab(cfg)
    if vocab is not None:
        return vocab
    path, size = cfg.run_dir / FILE_NAME, cfg.recycle.draft_vocab
    prefixes, _ = parse_blend(cfg.data.prefixes)
    log.info("counting tokens of %s for a %d-token draft vocabulary", ", ".join(prefixes), size)
    counts = count_tokens(prefixes, cfg.model.build().vocab_size)
    vocab = DraftVocab.from_counts(counts, size)
    if writes_files:
        path.parent.mkdir(parents=True, exist_ok=True)
        vocab.save(path)
    log.info("draft vocabulary: %d tokens cover %.1f %% of the training tokens", size,
             100 * float(counts[vocab.token_ids].sum() / counts.sum().clamp(min=1)))
    return vocab


def saved_draft_vocab(cfg: RunConfig):
    """The run directory's draft vocabulary when recycle.draft_vocab asks for one and it exists (checked by
    pretrain.train before any process group starts: a module trains over one draft vocabulary)."""
    from model.draft_vocab import FILE_NAME, DraftVocab

    path, size = cfg.run_dir / FILE_NAME, cfg.recycle.draft_vocab
    if not size or not path.is_file():
        return None
    vocab = DraftVocab.load(path)
    if len(vocab) != size:
        raise ValueError(f"{path} holds {len(vocab)} tokens but recycle.draft_vocab={size}; a module trains over "
                         f"one draft vocabulary: set recycle.draft_vocab={len(vocab)} or use a new run.dir")
    return vocab


def build_runtime(cfg: RunConfig) -> Runtime:
    from parallel.engine import build_engine
    from parallel.setup import init_distributed, seed_everything

    dims = parallel_dims(cfg)
    ctx = init_distributed(dims)
    seed_everything(cfg.seed, dims)
    model_cfg = cfg.model.build()
    engine, _ = build_engine(
        model_cfg, dims, ds_config(cfg, dims), cfg.seed, objective=training_objective(cfg, ctx.rank == 0),
        detach_base=cfg.recycle.detach_base, base_bf16=cfg.recycle.base_bf16, module_bf16=cfg.recycle.module_bf16,
        activation_checkpointing=cfg.train.activation_checkpointing,
        optimizer_factory=lambda module: make_optimizer(module, cfg.train),
        scheduler_factory=lambda optimizer: make_scheduler(optimizer, cfg.train),
        init_state=imported_weights(cfg))
    if not engine.zero_optimization() and not engine.bfloat16_enabled():
        _record_fp32_grad_norm(engine)
    return Runtime(engine, ctx, cfg)

