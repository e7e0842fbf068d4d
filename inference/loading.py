"""Getting a model and tokenizer for decoding on one process: from a run directory or an HF export
(random init and tensor-parallel shards: inference/tp_loading.py).

Weights are cast parameter by parameter, never with `model.to(dtype)`: that would also cast the rotary
cos/sin tables, and bf16 tables put visible errors into positions beyond a few hundred.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model import RecycleGPT
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


# ------------------------------------------------------------------------------------------ memory
def memory_available(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


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
