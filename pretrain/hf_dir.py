"""Reading a Hugging Face Llama folder (our export, or any plain Llama such as SmolLM2) into our model.

The key maps live next door (pretrain/hf_convert.py); this file turns config.json into a `ModelConfig`
(rope scaling, tied embeddings, GQA) and the safetensors files into state dicts. Anything in config.json
that would change the model's math and that we do not implement is one clear error, never ignored.
"""
from __future__ import annotations

import json
from pathlib import Path

from pretrain.hf_convert import from_hf, rope_fields

MODULE_FILE = "recycle_module.safetensors"
# Fields that change the math and that we do not implement: refused unless they hold the harmless value.
UNSUPPORTED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1}


class ModelLoadError(Exception):
    """A model or tokenizer could not be loaded; the message names the problem and the fix."""


def weight_files(path: Path) -> list[str]:
    """The base weights' files: model.safetensors, a sharded model.safetensors.index.json, or any other *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    return sorted(f.name for f in path.glob("*.safetensors") if f.name != MODULE_FILE)


def read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for name in weight_files(path):
        tensors.update(load_file(str(path / name)))
    return tensors


def model_config(hf: dict, path: Path, recycle_layers: int):
    from model import ModelConfig

    for key, harmless in UNSUPPORTED.items():
        if hf.get(key, harmless) != harmless:
            raise ModelLoadError(f"{path}/config.json: {key}={hf[key]!r} is not supported (only {harmless!r})")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ModelLoadError(f"{path}/config.json: head_dim={hf['head_dim']} != hidden_size / num_attention_heads; "
                             "only the standard head size is supported")
    try:
        rope = rope_fields(hf)
    except ValueError as err:
        raise ModelLoadError(f"{path}/config.json: {err}") from None
    try:
        return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                           num_layers=hf["num_hidden_layers"], num_heads=heads,
                           num_kv_heads=hf.get("num_key_value_heads") or heads,
                           ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                           recycle_layers=recycle_layers, norm_eps=hf.get("rms_norm_eps", 1e-5),
                           **rope)
    except (KeyError, ValueError, TypeError) as err:
        raise ModelLoadError(f"{path}/config.json does not describe a Llama model: {err}") from None


def read_hf_dir(path: Path, default_recycle_layers: int | None = None):
    """(ModelConfig, base state dict in HF names, module state dict `recycle.*` or {}) from an HF folder.

    Our export: config.json (LlamaConfig + recycle_layers) + model.safetensors + recycle_module.safetensors.
    A plain Llama folder has no module: recycle_layers = default_recycle_layers (0 when None, a plain LM).
    Tied embeddings (tie_word_embeddings, no lm_head.weight) become an untied copy of the embedding.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type", "llama") != "llama":
        raise ModelLoadError(f"{path}/config.json: model_type={hf['model_type']!r}; only Llama models are supported")
    tensors = read_weights(path)
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
    cfg = model_config(hf, path, recycle_layers)
    if "lm_head.weight" not in base and "model.embed_tokens.weight" in base:
        if not hf.get("tie_word_embeddings", True):
            raise ModelLoadError(f"{path}: no lm_head.weight and tie_word_embeddings=false; the weights are incomplete")
        base["lm_head.weight"] = base["model.embed_tokens.weight"]
    return cfg, {k: v.float() for k, v in base.items()}, {k: v.float() for k, v in module.items()}


def load_hf_dir(path: Path):
    """A RecycleGPT from an HF folder (pretrain.export_hf's format, or a plain Llama: then a plain LM,
    standard mode only)."""
    from model import RecycleGPT

    cfg, base, module = read_hf_dir(Path(path))
    try:
        model = RecycleGPT(cfg)
        model.load_state_dict(from_hf(cfg, base, module), strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"{path} does not look like a RecycleGPT/Llama export: {err}") from None
    return model.eval()
