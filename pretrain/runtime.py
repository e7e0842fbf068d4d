"""The parallel side of a run as the trainer sees it: process groups, the engine, ranks, forward, reductions."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import RecycleGPT
from pretrain.config import RunConfig
from pretrain.engine import deepspeed_config, launcher_env_defaults, use_bf16
from pretrain.flops import throughput_row
from pretrain.optim import make_optimizer, make_scheduler


def validate_parallel(cfg: RunConfig):
    """Checks that need no process group (world size from the launcher's environment)."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp != 1 or pp != 1:
        raise ValueError(f"parallel.tp={tp} parallel.pp={pp}: tensor/pipeline parallel training is not wired "
                         "into the trainer yet; use parallel.tp=1 parallel.pp=1")
    deepspeed_config(cfg, world)


@dataclass
class Runtime:
    engine: object
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    bf16: bool
    device: torch.device
    cfg: RunConfig

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def forward(self, engine, batch: dict, train: bool):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return engine(batch["tokens"], batch["labels"], batch["loss_mask"])

    def average_over_dp(self, value: float) -> float:
        if self.dp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.dp_size

    def grad_norm(self, engine) -> float:
        """Global gradient norm before clipping. ZeRO and bf16 optimizers compute it during the step; for a plain
        fp32 engine it is taken here from the (already data-parallel averaged) gradients."""
        if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled():
            return math.nan   # the trainer reads engine.get_global_grad_norm() after the step
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0

    def throughput(self, tokens_per_s: float) -> dict:
        return throughput_row(self.cfg.model.build(), self.cfg.train.seq_length, tokens_per_s, self.world_size)

    def shutdown(self):
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def build_runtime(cfg: RunConfig) -> Runtime:
    import deepspeed

    launcher_env_defaults()
    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = RecycleGPT(cfg.model.build()).to(device)
    model.recycle_weight = cfg.recycle.weight
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.recycle.detach_base:
        model.freeze_base()
    optimizer = make_optimizer(model, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=make_scheduler(optimizer, cfg.train),
                                           config=deepspeed_config(cfg, world))
    return Runtime(engine, rank, world, rank, world, use_bf16(cfg), device, cfg)
