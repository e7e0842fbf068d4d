"""Model FLOPs per token, per-device TFLOP/s and MFU against a table of peak dense bf16 throughput."""
from __future__ import annotations

import torch

from model.config import ModelConfig

# Dense (non-sparse) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0,
    "MI300X": 1307.0, "MI250X": 383.0,
}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):   # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x (matmul parameters) + attention scores, for base and module (both run every training step)."""
    n = cfg.num_parameters()
    matmul_params = n["total"] - cfg.vocab_size * cfg.hidden_size   # the embedding lookup is not a matmul
    head_again = cfg.vocab_size * cfg.hidden_size if cfg.recycle_layers else 0  # W_out is applied twice
    attention = 2 * 2 * seq_len * cfg.hidden_size * (cfg.num_layers + cfg.recycle_layers)  # QK^T and AV
    return 6 * (matmul_params + head_again) + 3 * attention


def throughput_row(cfg: ModelConfig, seq_len: int, tokens_per_s: float, world_size: int) -> dict:
    per_device = train_flops_per_token(cfg, seq_len) * tokens_per_s / world_size / 1e12
    row = {"tflops_per_device": per_device}
    peak = device_peak_tflops()
    if peak:
        row["mfu"] = per_device / peak
    if torch.cuda.is_available():
        row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        import resource
        row["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return row
