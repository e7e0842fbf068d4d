"""Token counts over tokenized shards (megatron-core indexed datasets), for draft vocabularies."""
from __future__ import annotations

import torch


def count_tokens(prefixes: list[str], vocab_size: int | None = None, progress=None) -> torch.Tensor:
    """Token counts over megatron-core indexed datasets (`PREFIX.bin` / `PREFIX.idx`)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = np.zeros(vocab_size or 1, dtype=np.int64)
    for prefix in prefixes:
        data = IndexedDataset(prefix)
        for i in range(len(data)):
            c = np.bincount(np.asarray(data[i], dtype=np.int64))
            if c.size > counts.size:
                counts = np.pad(counts, (0, c.size - counts.size))
            counts[:c.size] += c
            if progress is not None:
                progress(i + 1, len(data), prefix)
    return torch.from_numpy(counts)
