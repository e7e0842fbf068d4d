"""One entry for the trainer: the DeepSpeed engine for any (tp, pp, dp, ZeRO) layout.

    dims = ParallelDims.from_config(model_cfg, cfg.parallel)
    init_distributed(dims)
    ds = deepspeed_config(dims, micro_batch=..., global_batch=..., grad_clip=..., zero_stage=...)
    engine, module = build_engine(model_cfg, dims, ds, seed, optimizer_factory=..., scheduler_factory=...)
    losses = train_batch(engine, micro_batches)        # same call for pp == 1 and pp > 1
    losses = eval_batch(engine, micro_batches)         # no update

pp == 1: `engine` is a DeepSpeedEngine around RecycleGPT (TP layers inside when tp > 1) and
`engine(input_ids, labels, loss_mask) -> LossOutput`. pp > 1: a PipelineEngine around `RecyclePipe`;
drive it with `engine.train_batch(PipeBatches(...))` (what `train_batch` here does).

The optimizer and LR schedule come from the caller as factories, so the trainer keeps one definition for
every layout: `optimizer_factory(module) -> torch.optim.Optimizer` gets the module this rank trains (the
model or the pipeline stage; its parameters are this rank's shards), `scheduler_factory(optimizer)` gets
the torch optimizer. Without an optimizer_factory the DeepSpeed JSON must have an "optimizer" section.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.objective import LossOutput, RecycleObjective
from model.spec import LocalSpec
from parallel import bf16_choice
from parallel.dims import ParallelDims, check_detach_base
from parallel.setup import current


def resolve_bf16(base_bf16, module_bf16, device, model_cfg: ModelConfig) -> tuple[bool, bool]:
    """recycle.base_bf16 / module_bf16 as bools: 'auto' measured once for the model's shapes and logged once
    (parallel/bf16_choice.py)."""
    settings = (base_bf16, module_bf16)
    if "auto" not in settings:
        return bool(base_bf16), bool(module_bf16)
    device = torch.device(device)
    width, ffn = model_cfg.hidden_size, model_cfg.ffn_hidden_size
    auto = bf16_choice.resolve("auto", device, width, ffn)
    if current().rank == 0:
        why = f": a bf16 matmul ran {bf16_choice.bf16_speedup(width, ffn):.2f}x fp32's speed" \
            if device.type == "cpu" else ""
        print(f"[bf16] auto -> {'bf16' if auto else 'fp32'} on {device}{why}", flush=True)
    return tuple(auto if s == "auto" else bool(s) for s in settings)


def build_engine(model_cfg: ModelConfig, dims: ParallelDims, ds_config: dict, seed: int,
                 objective: RecycleObjective = RecycleObjective(), detach_base: bool = False,
                 activation_checkpointing: bool = False, base_bf16: bool = False, module_bf16: bool = False,
                 optimizer_factory: Callable | None = None, scheduler_factory: Callable | None = None,
                 init_state: dict | None = None):
    """-> (engine, module). Weights equal `torch.manual_seed(seed); RecycleGPT(model_cfg)` on every layout,
    or `init_state` (a one-device state dict, e.g. from pretrain.import_hf) when given."""
    import deepspeed

    from parallel.pipeline import RecyclePipe
    from parallel.weights import load_full_state
    from parallel.tensor_parallel import TensorParallelSpec, build_tp_model

    dims.validate_model(model_cfg)
    check_detach_base(detach_base, dims.pp)
    if optimizer_factory is None and "optimizer" not in ds_config:
        raise ValueError("build_engine needs an optimizer_factory or an 'optimizer' section in the DeepSpeed config")
    ctx = current()
    if (ctx.dims.tp, ctx.dims.pp, ctx.dims.dp) != (dims.tp, dims.pp, dims.dp):
        raise ValueError(f"build_engine got {dims} but the process groups were built for {ctx.dims}")
    spec = TensorParallelSpec(dims.tp) if dims.tp > 1 else LocalSpec()
    if dims.pp == 1:
        module = build_tp_model(model_cfg, seed, spec, state=init_state)
        module.objective = objective
        module.activation_checkpointing = activation_checkpointing
        if detach_base:
            base_in_bf16, module_in_bf16 = resolve_bf16(base_bf16, module_bf16, ctx.device, model_cfg)
            module.freeze_base(bf16=base_in_bf16, module_bf16=module_in_bf16)
        mpu = ctx.grid
    else:
        module = RecyclePipe(model_cfg, spec, ctx.topology, seed if init_state is None else None, objective,
                             detach_base, activation_checkpointing)
        if init_state is not None:
            load_full_state(module, init_state, model_cfg, spec.tp_rank, spec.tp_size)
        mpu = None                                   # the PipelineModule brings its own grid
    module.to(ctx.device)
    optimizer = optimizer_factory(module) if optimizer_factory is not None else None
    params = None if optimizer is not None else [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=params,
                                           lr_scheduler=scheduler_factory, mpu=mpu, config=ds_config)
    _undo_init_step(engine)
    if dims.dp == 1 and dims.pp == 1 and engine.zero_optimization_stage() == 0:
        # One data-parallel rank: DeepSpeed would still flatten, average over a group of one and copy back
        # every gradient (5-9 % of a 125m CPU step, benchmarks/train_throughput.py).
        engine.enable_backward_allreduce = False
    return engine, module


@torch.no_grad()
def _undo_init_step(engine):
    """bf16 with ZeRO 0 and pp == 1 wraps the optimizer in DeepSpeed's FP16_UnfusedOptimizer, which runs one
    real `optimizer.step()` on zero gradients at construction to create the optimizer state. For AdamW that
    is not a no-op: the step counter becomes 1 (the first real update is ~25 % too small by bias
    correction) and the fp32 master weights are decayed once by lr x weight_decay. Undo both: masters back
    from the bf16 weights they were copied from, optimizer state cleared (torch optimizers create it lazily)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if isinstance(opt, FP16_UnfusedOptimizer):
        for low, master in zip(opt.fp16_groups, opt.fp32_groups):
            for p_low, p_master in zip(low, master):
                p_master.copy_(p_low)
        opt.optimizer.state.clear()


def train_batch(engine, micro_batches: Iterable[dict]) -> LossOutput:
    """One optimizer step over `gradient_accumulation_steps` micro-batches ({'tokens', 'labels',
    'loss_mask'} dicts, this dp rank's) -> LossOutput (loss, lm_loss, recycle_loss, deeper depths' losses)
    averaged over micro-batches and dp, on every rank. Works for the plain and the pipeline engine."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from parallel.pipeline import PipeBatches, pipe_losses

    if isinstance(engine, PipelineEngine):
        engine.train_batch(PipeBatches(micro_batches))
        out = pipe_losses(engine)
        return LossOutput(*(None if t is None else t.detach().float().reshape(()) for t in out[:3]),
                          tuple(t.detach().float().reshape(()) for t in out.deeper_losses))
    device = engine.device
    sums, n = None, 0
    it = iter(micro_batches)
    for _ in range(engine.gradient_accumulation_steps()):
        b = next(it)
        mask = b.get("loss_mask")
        out = engine(b["tokens"].to(device), b["labels"].to(device), None if mask is None else mask.to(device))
        engine.backward(out.loss)
        engine.step()
        vec = out.vector()
        sums = vec if sums is None else sums + vec
        n += 1
    sums /= n
    dp_group = _data_parallel_group()
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(sums, group=dp_group)
        sums /= dist.get_world_size(dp_group)
    has_rec = getattr(getattr(engine, "module", None), "recycle", None) is not None
    return LossOutput.from_vector(sums, has_rec)


@torch.no_grad()
def eval_batch(engine, micro_batches: list[dict]) -> LossOutput:
    """Mean LossOutput over this dp rank's `micro_batches` and over dp, no update, on every
    rank. Any number of micro-batches (the pipeline runs them as one inference schedule)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from parallel.pipeline import PipeBatches

    micro_batches = list(micro_batches)
    module = engine.module
    if isinstance(engine, PipelineEngine):
        module.reset_loss_sums()
        engine.eval_batch(PipeBatches(micro_batches), num_micro_batches=len(micro_batches), bcast_loss=False)
        width = max(3, 1 + len(module.loss_names()))     # LossOutput.vector(): loss, lm, recycle, deeper
        sums = module.loss_sums / module.loss_count if module.loss_count else torch.zeros(width, device=engine.device)
        if engine.grid.get_pipe_parallel_world_size() > 1:   # only the last stage has losses; the others add 0
            dist.all_reduce(sums, group=engine.grid.get_pipe_parallel_group())
        has_rec = module.cfg.recycle_layers > 0
    else:
        was_training = module.training
        engine.eval()
        device, sums = engine.device, None
        for b in micro_batches:
            mask = b.get("loss_mask")
            out = engine(b["tokens"].to(device), b["labels"].to(device), None if mask is None else mask.to(device))
            sums = out.vector() if sums is None else sums + out.vector()
        sums /= len(micro_batches)
        engine.train(was_training)
        has_rec = getattr(module, "recycle", None) is not None
    dp_group = _data_parallel_group()
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(sums, group=dp_group)
        sums /= dist.get_world_size(dp_group)
    return LossOutput.from_vector(sums, has_rec)


def _data_parallel_group():
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None
