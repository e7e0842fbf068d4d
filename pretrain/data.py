"""Training and validation batches from the megatron-core datasets data_prep builds.

Sample order is a pure function of the global sample index, so a resumed run (even under another
data-parallel size) continues with exactly the samples an uninterrupted run would have seen next.
"""
from __future__ import annotations

import numpy as np
import torch

from pretrain.config import RunConfig


def build_run_datasets(cfg: RunConfig, dp_size: int):
    from data_prep.datasets import build_datasets

    t = cfg.train
    n_train = t.steps * t.global_batch_size
    n_valid = t.eval_iters * t.micro_batch_size * dp_size
    train, valid, _ = build_datasets(cfg.data, t.seq_length, cfg.seed, (n_train, n_valid, 0))
    return train, valid


class Batches:
    """Micro-batches for one data-parallel rank: rank r of micro-batch group i reads global samples
    start + (i * dp + r) * micro ... + micro - 1."""

    def __init__(self, dataset, start_sample: int, micro: int, dp_rank: int, dp_size: int, device="cpu"):
        self.dataset, self.micro, self.dp_rank, self.dp_size = dataset, micro, dp_rank, dp_size
        self.start, self.group, self.device = start_sample, 0, device

    def next(self) -> dict:
        first = self.start + (self.group * self.dp_size + self.dp_rank) * self.micro
        self.group += 1
        items = [self.dataset[(first + j) % len(self.dataset)] for j in range(self.micro)]
        batch = {key: torch.from_numpy(np.stack([np.asarray(it[key]) for it in items]))
                 for key in ("tokens", "labels", "loss_mask")}
        batch["tokens"] = batch["tokens"].long()
        batch["labels"] = batch["labels"].long()
        batch["loss_mask"] = batch["loss_mask"].float()
        return {k: v.to(self.device) for k, v in batch.items()}
