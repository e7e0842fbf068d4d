"""Getting a model and tokenizer for decoding: from a run directory, an HF export, or a preset at random init.

Weights are cast parameter by parameter, never with `model.to(dtype)`: that would also cast the rotary
cos/sin tables, and bf16 tables put visible errors into positions beyond a few hundred.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model import RecycleGPT, preset

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(Exception):
    """A model or tokenizer could not be loaded; the message names the problem and the fix."""


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
    """(model, tokenizer or None) from a RUN_DIR (has config.yaml) or an HF_DIR (has config.json)."""
    path = Path(path)
    if (path / "config.yaml").exists():
        if (path / "init" / "model.safetensors").is_file() and not (path / "checkpoints" / "latest").is_file():
            model, tokenizer = load_imported_run(path)
            return place(model, dtype, device), tokenizer
        try:
            from pretrain.checkpoint import load_for_inference
        except ImportError as err:
            raise ModelLoadError(f"loading a RUN_DIR needs pretrain.checkpoint.load_for_inference ({err}); "
                                 "update the checkout or export the run with pretrain.export_hf") from None
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


MODULE_FILE = "recycle_module.safetensors"


def _read_weights(path: Path) -> dict:
    """The base weights: model.safetensors, a sharded model.safetensors.index.json, or any other *.safetensors."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(f.name for f in path.glob("*.safetensors") if f.name != MODULE_FILE)
    tensors = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def read_hf_dir(path: Path, default_recycle_layers: int | None = None):
    """(ModelConfig, base state dict in HF names, module state dict `recycle.*` or {}) from an HF folder.

    Our export: config.json (LlamaConfig + recycle_layers) + model.safetensors + recycle_module.safetensors.
    A plain Llama folder has no module: recycle_layers = default_recycle_layers (0 when None, a plain LM).
    """
    from safetensors.torch import load_file

    from model import ModelConfig

    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    tensors = _read_weights(path)
    module_file = path / (hf.get("recycle_module_file") or MODULE_FILE)
    if module_file.is_file():
        tensors.update(load_file(str(module_file)))
    if not tensors:
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights; re-run pretrain.export_hf")
    module = {k: v for k, v in tensors.items() if k.startswith("recycle.")}
    base = {k: v for k, v in tensors.items() if not k.startswith("recycle.")}
    module_layers = len({int(k.split(".")[2]) for k in module if k.startswith("recycle.layers.")})
    recycle_layers = module_layers if module else (default_recycle_layers or 0)
    if module and hf.get("recycle_layers", module_layers) != module_layers:
        raise ModelLoadError(f"{path}: config.json says recycle_layers={hf['recycle_layers']} but the module file "
                             f"holds {module_layers} layers; re-run pretrain.export_hf")
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    try:
        cfg = ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                          num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                          num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                          ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                          recycle_layers=recycle_layers, rope_theta=float(rope), norm_eps=hf.get("rms_norm_eps", 1e-5))
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"{path}/config.json does not describe a Llama model: {err}") from None
    if hf.get("tie_word_embeddings") and "lm_head.weight" not in base:
        base["lm_head.weight"] = base["model.embed_tokens.weight"]
    return cfg, {k: v.float() for k, v in base.items()}, {k: v.float() for k, v in module.items()}


def load_hf_dir(path: Path) -> RecycleGPT:
    """A RecycleGPT from an HF folder (pretrain.export_hf's format, or a plain Llama: then a plain LM,
    standard mode only)."""
    from pretrain.hf_convert import from_hf

    cfg, base, module = read_hf_dir(Path(path))
    try:
        model = RecycleGPT(cfg)
        model.load_state_dict(from_hf(cfg, base, module), strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"{path} does not look like a RecycleGPT/Llama export: {err}") from None
    return model


def load_imported_run(path: Path):
    """(model, tokenizer) from a RUN_DIR made by pretrain.import_hf that has not trained yet (init/ weights)."""
    from safetensors.torch import load_file

    from pretrain.config import load_config

    cfg = load_config(str(path / "config.yaml")).model.build()
    model = RecycleGPT(cfg)
    model.load_state_dict(load_file(str(path / "init" / "model.safetensors")), strict=True)
    tokenizer = load_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    return model.eval(), tokenizer
