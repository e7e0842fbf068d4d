"""Pure key maps between our state dict and Hugging Face `LlamaForCausalLM` (plus the module's own file).

Our fused weights split cleanly: linear_qkv = [q_proj; k_proj; v_proj] and linear_fc1 = [gate_proj; up_proj],
both with the rotate-half rotary convention HF LLaMA uses, so no head permutation is needed.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig

# config.json values of rope_type (transformers' names) -> ours; "default" is plain rotary.
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}

_LAYER_RENAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _layer_to_hf(cfg: ModelConfig, ours: dict, prefix_in: str, prefix_out: str) -> dict:
    out = {}
    for ours_key, hf_key in _LAYER_RENAMES.items():
        out[prefix_out + hf_key] = ours[prefix_in + ours_key]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    wq, wk, wv = ours[prefix_in + "self_attention.linear_qkv.weight"].split([q, kv, kv])
    out[prefix_out + "self_attn.q_proj.weight"] = wq
    out[prefix_out + "self_attn.k_proj.weight"] = wk
    out[prefix_out + "self_attn.v_proj.weight"] = wv
    gate, up = ours[prefix_in + "mlp.linear_fc1.weight"].chunk(2)
    out[prefix_out + "mlp.gate_proj.weight"] = gate
    out[prefix_out + "mlp.up_proj.weight"] = up
    return out


def _layer_sources(prefix_hf: str, prefix_ours: str) -> dict:
    out = {prefix_ours + ours: (prefix_hf + theirs,) for ours, theirs in _LAYER_RENAMES.items()}
    out[prefix_ours + "self_attention.linear_qkv.weight"] = tuple(prefix_hf + f"self_attn.{n}_proj.weight" for n in "qkv")
    out[prefix_ours + "mlp.linear_fc1.weight"] = (prefix_hf + "mlp.gate_proj.weight", prefix_hf + "mlp.up_proj.weight")
    return out


def hf_sources(cfg: ModelConfig, with_module: bool = True) -> dict[str, tuple[str, ...]]:
    """{our name: the HF key(s) it is made of}; several keys are concatenated along dim 0 (fused qkv and
    gate+up, the blocks `parallel.tensor_parallel.tp_layout` splits one by one). One rule for `from_hf` and
    for loaders that read only a tensor-parallel rank's slices of each HF tensor."""
    out = {"embedding.weight": ("model.embed_tokens.weight",), "final_norm.weight": ("model.norm.weight",),
           "lm_head.weight": ("lm_head.weight",)}
    for i in range(cfg.num_layers):
        out.update(_layer_sources(f"model.layers.{i}.", f"layers.{i}."))
    if with_module and cfg.recycle_layers:
        for name in ("hidden_norm.weight", "embed_norm.weight", "linear_in.weight", "final_norm.weight"):
            out[f"recycle.{name}"] = (f"recycle.{name}",)
        for i in range(cfg.recycle_layers):
            out.update(_layer_sources(f"recycle.layers.{i}.", f"recycle.layers.{i}."))
    return out


def to_hf(cfg: ModelConfig, ours: dict) -> tuple[dict, dict]:
    """Our state dict -> (LlamaForCausalLM state dict, recyclable-module state dict in HF-style names)."""
    base = {"model.embed_tokens.weight": ours["embedding.weight"],
            "model.norm.weight": ours["final_norm.weight"],
            "lm_head.weight": ours["lm_head.weight"]}
    for i in range(cfg.num_layers):
        base.update(_layer_to_hf(cfg, ours, f"layers.{i}.", f"model.layers.{i}."))
    module = {}
    if cfg.recycle_layers:
        for name in ("hidden_norm.weight", "embed_norm.weight", "linear_in.weight", "final_norm.weight"):
            module[f"recycle.{name}"] = ours[f"recycle.{name}"]
        for i in range(cfg.recycle_layers):
            module.update(_layer_to_hf(cfg, ours, f"recycle.layers.{i}.", f"recycle.layers.{i}."))
    return {k: v.contiguous() for k, v in base.items()}, {k: v.contiguous() for k, v in module.items()}


def from_hf(cfg: ModelConfig, base: dict, module: dict | None = None) -> dict:
    """Inverse of `to_hf`. Without a module file the module keys are absent (load with strict=False)."""
    hf = {**base, **(module or {})}
    return {ours: torch.cat([hf[k] for k in keys]) if len(keys) > 1 else hf[keys[0]]
            for ours, keys in hf_sources(cfg, with_module=bool(module)).items()}


def llama_config_kwargs(cfg: ModelConfig) -> dict:
    """Arguments for `transformers.LlamaConfig` describing our base model."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                rope_scaling=None if cfg.rope_scaling == "none" else rope_parameters(cfg),
                attention_bias=False, mlp_bias=False, hidden_act="silu")


def rope_fields(hf: dict) -> dict:
    """ModelConfig's rope_* fields from config.json: `rope_parameters` (transformers 5) or `rope_scaling` +
    `rope_theta` (transformers 4)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)} "
                         "(ignoring it would silently change the model)")
    out = {"rope_theta": float(theta), "rope_scaling": ROPE_TYPES[kind]}
    if kind == "linear":
        out["rope_scaling_factor"] = float(params["factor"])
    elif kind == "llama3":
        try:
            out.update(rope_scaling_factor=float(params["factor"]),
                       rope_low_freq_factor=float(params["low_freq_factor"]),
                       rope_high_freq_factor=float(params["high_freq_factor"]),
                       rope_original_max_positions=int(params["original_max_position_embeddings"]))
        except KeyError as err:
            raise ValueError(f"llama3 rope scaling without {err}") from None
    return out


def rope_parameters(cfg) -> dict:
    """The inverse of `rope_fields`, for config.json (transformers reads `rope_parameters`, or `rope_scaling`
    in 4.x; both carry rope_type)."""
    params = {"rope_type": {v: k for k, v in ROPE_TYPES.items()}[cfg.rope_scaling], "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        params["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_positions)
    return params
