"""Getting a model and tokenizer for decoding: from a run directory, an HF export, or a preset at random init.

Weights are cast parameter by parameter, never with `model.to(dtype)`: that would also cast the rotary
cos/sin tables, and bf16 tables put visible errors into positions beyond a few hundred.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model import RecycleGPT, preset
from pretrain.hf_dir import ModelLoadError, load_hf_dir  # noqa: F401  (ModelLoadError: the CLI catches it)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def place(model: RecycleGPT, dtype: torch.dtype, device) -> RecycleGPT:
    model.to(device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------ tokenizers
def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a tokenizer from {path}: {err}") from None


def default_tokenizer(vocab_size: int):
    """The bundled GPT-2 BPE for GPT-2-sized vocabularies, the 8k corpus BPE for small ones (None if absent)."""
    folder = ASSETS / ("gpt2" if vocab_size > 8192 else "sotu-bpe-8k")
    return load_tokenizer(folder) if (folder / "tokenizer.json").exists() else None


# ------------------------------------------------------------------------------------------ random init
def memory_needed(cfg, dtype: torch.dtype, cache_len: int) -> int:
    """Bytes for the weights plus both KV caches at batch 1 (activations are small at decode time)."""
    size = torch.tensor([], dtype=dtype).element_size()
    kv = 2 * (cfg.num_layers + cfg.recycle_layers) * cfg.num_kv_heads * cfg.head_dim * cache_len
    return (cfg.num_parameters()["total"] + kv) * size


def memory_available(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def random_init_model(name: str, dtype: torch.dtype, device, seed: int = 0, cache_len: int = 0) -> RecycleGPT:
    """A preset at its own initialisation, built directly in `dtype` on `device` (a 7B model is never
    materialised in fp32 on the host). Fails fast when it would not fit in the device's free memory."""
    cfg = preset(name)
    device = torch.device(device)
    need, have = memory_needed(cfg, dtype, cache_len), memory_available(device)
    if need > 0.9 * have:
        hint = "--dtype bf16, " if dtype == torch.float32 else ""
        raise ModelLoadError(f"--preset {name} needs about {need / 2**30:.1f} GiB ({cfg.num_parameters()['total'] / 1e9:.2f}B "
                             f"parameters in {dtype}) but only {have / 2**30:.1f} GiB is free on {device}; "
                             f"use {hint}a smaller preset, or a GPU (--device cuda)")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)        # parameters are born in dtype; rotary tables stay fp32
        with torch.device(device):
            model = RecycleGPT(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# ------------------------------------------------------------------------------------------ directories
def load_model_dir(path, dtype: torch.dtype, device):
    """(model, tokenizer or None) from a RUN_DIR (has config.yaml) or an HF_DIR (has config.json); the reading
    itself lives in pretrain/ (checkpoint.load_for_inference, hf_dir.load_hf_dir)."""
    path = Path(path)
    if (path / "config.yaml").exists():
        from pretrain.checkpoint import load_for_inference
        try:
            model, tokenizer = load_for_inference(path)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f"could not load {path}: {err}") from None
        return place(model, dtype, device), tokenizer
    if (path / "config.json").exists():
        model = load_hf_dir(path)
        tokenizer = load_tokenizer(path) if (path / "tokenizer.json").exists() else None
        return place(model, dtype, device), tokenizer
    raise ModelLoadError(f"{path} has neither config.yaml (a RUN_DIR from pretrain.train) nor config.json "
                         "(an HF_DIR from pretrain.export_hf); pass one of those")
