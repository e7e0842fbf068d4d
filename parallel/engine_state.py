"""Writing a one-device training state (parallel/ds_checkpoint.py's TrainingState) into a built DeepSpeed engine of
any layout, and what a checkpoint records about the engine's optimizer (`optimizer_param_names`)."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from parallel.ds_checkpoint import TrainingState
from parallel.layout import shard_state_dict
from parallel.weights import full_named_parameters


def optimizer_param_names(engine) -> list[list[str]]:
    """One-device names of the torch optimizer's parameters, group by group, on this rank: saved with every
    checkpoint (under OPTIMIZER_NAMES_KEY) so a reader maps optimizer indices to parameters without guessing."""
    optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
    names = {id(p): n for n, p in full_named_parameters(engine.module)}
    return [[names.get(id(p), "") for p in group["params"]] for group in optimizer.param_groups]


def _adam_state(torch_opt, p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float) -> dict:
    """What torch's Adam/AdamW `_init_group` would have created for `p`, filled in (a step tensor per
    parameter: the optimizer increments it in place)."""
    # ZeRO 3 puts its flat partitions into the param groups only around step(); the groups agree on these flags.
    group = next((g for g in torch_opt.param_groups if any(q is p for q in g["params"])), torch_opt.param_groups[0])
    on_device = bool(group.get("fused") or group.get("capturable"))
    return {"step": torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu"),
            "exp_avg": exp_avg.to(device=p.device, dtype=p.dtype).reshape(p.shape).clone(),
            "exp_avg_sq": exp_avg_sq.to(device=p.device, dtype=p.dtype).reshape(p.shape).clone()}


@torch.no_grad()
def load_training_state(engine, state: TrainingState, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1) -> bool:
    """Put a one-device TrainingState into a built DeepSpeed engine of any layout, before its first step: this
    rank's TP shard of every parameter it holds (its pipeline stage) into the module, the fp32 master
    copies the optimizer keeps (ZeRO 1/2/3 partitions, BF16/FP16-unfused masters) and, when the state has
    them, Adam's moments and step count into the optimizer state. Returns whether the moments were loaded
    (else the optimizer state stays empty: Adam starts its moments and bias correction afresh)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = full_named_parameters(engine.module)
    trainable = [(n, p) for n, p in params if p.requires_grad]
    moments = state.has_moments and all(n in state.exp_avg for n, _ in trainable)

    def local(d: dict, name: str, p) -> torch.Tensor:
        value = d[name] if state.tp_shard == (tp_rank, tp_size) else \
            shard_state_dict({name: d[name]}, cfg, tp_rank, tp_size)[name]
        want = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(value.shape) != want:
            raise ValueError(f"{name}: this rank holds {want}, the checkpoint gives {tuple(value.shape)} for TP rank "
                             f"{tp_rank}/{tp_size}; is it from a model with another config?")
        return value

    zero3 = any(hasattr(p, "ds_id") for _, p in params)
    for name, p in params:                                       # the module's (low-precision) weights
        value = local(state.weights, name, p)
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))

    opt = engine.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition", None)
    if flats is not None:                                        # ZeRO 1/2, BF16_Optimizer: lp -> hp fragments
        if moments:
            for flat in flats:
                opt.optimizer.state[flat] = _adam_state(opt.optimizer, flat, torch.zeros_like(flat),
                                                        torch.zeros_like(flat), state.step)
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()          # fragments of this rank's params -> the new state
        for name, p in trainable:
            safe_set_full_fp32_param(p, local(state.weights, name, p).to(p.device))
            if moments:
                safe_set_full_optimizer_state(p, local(state.exp_avg, name, p).to(p.device), "exp_avg")
                safe_set_full_optimizer_state(p, local(state.exp_avg_sq, name, p).to(p.device), "exp_avg_sq")
    elif hasattr(opt, "fp32_partitioned_groups_flat"):           # ZeRO 3: each parameter split evenly over dp
        if moments:
            for flat in opt.fp32_partitioned_groups_flat:
                opt.optimizer.state[flat] = _adam_state(opt.optimizer, flat, torch.zeros_like(flat),
                                                        torch.zeros_like(flat), state.step)
        sources = [(None, state.weights)] + ([("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq)]
                                             if moments else [])
        for name, p in trainable:
            rank = opt._get_param_partition_rank(p)
            for key, source in sources:
                part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
                n = part.numel()
                flat = local(source, name, p).flatten()
                flat = torch.nn.functional.pad(flat, (0, max(0, (rank + 1) * n - flat.numel())))
                part.copy_(flat.narrow(0, rank * n, n).to(part.device, part.dtype))
    elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):   # FP16_UnfusedOptimizer (bf16, ZeRO 0)
        master_of = {id(lp): m for lows, masters in zip(opt.fp16_groups, opt.fp32_groups) for lp, m in zip(lows, masters)}
        for name, p in trainable:
            master = master_of[id(p)]
            master.copy_(local(state.weights, name, p).to(master.device))
            if moments:
                opt.optimizer.state[master] = _adam_state(opt.optimizer, master, local(state.exp_avg, name, p),
                                                          local(state.exp_avg_sq, name, p), state.step)
    elif isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):    # plain fp32 (ZeRO 0)
        if moments:
            for name, p in trainable:
                opt.state[p] = _adam_state(opt, p, local(state.exp_avg, name, p), local(state.exp_avg_sq, name, p),
                                           state.step)
    else:
        raise NotImplementedError(f"loading a resharded checkpoint into DeepSpeed's {type(opt).__name__} is not "
                                  "supported; resume with the layout the checkpoint was written with")
    return moments
