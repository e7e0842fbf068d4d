"""The recyclable module as vLLM's speculative draft (`pretrain.export_hf ... --vllm`; docs/serving.md).

vLLM (0.32) has no draft class for a Llama target whose draft head has our wiring, but its MiMo-V2 MTP
layer (vllm/model_executor/models/mimo_v2_mtp.py, method "mtp") is our module with N = 1, term by term:

    ours (DESIGN.md §1)                              vLLM MiMoV2MTPLayer
    RMSNorm_h(h_i), RMSNorm_e(E[x_{i+1}])            hnorm(previous_hidden), enorm(inputs_embeds)
    W_proj [hidden ; embed]                          eh_proj [embed ; hidden]    -> swap W_proj's halves
    decoder layer (pre-norm, GQA, rotary, SwiGLU)    input_layernorm, self_attn, pre_mlp_layernorm, mlp
    RMSNorm_r, then the base's LM head               final_layernorm, then the target's lm_head (shared)
    h_i after the base's final norm                  the target's hidden state after its final norm
    rotary position i + 1                            position i: every query and key shifts by the same
                                                     1, and rotary attention depends only on the
                                                     difference, so the scores are unchanged
    k drafts: the module on its own output g         mtp step j feeds back the layer's output (normed)

Unlike vLLM's MiMo (v1), DeepSeek and ERNIE MTP layers it does not zero the embedding at position 0, and
unlike its EAGLE/EAGLE-3 Llama drafts it keeps both input norms, the first layer's input norm and the
final norm; those would change the module's function, so they are not used. The draft folder holds the
MTP layer only: vLLM always shares the target's embedding and LM head with an MTP draft.

Written files: HF_DIR/vllm_draft/{config.json, model.safetensors} and HF_DIR/vllm_speculative_config.json,
the `speculative_config` dict for vLLM with the draft's absolute path.
"""
from __future__ import annotations

import json
from pathlib import Path

DRAFT_DIR = "vllm_draft"
SPEC_FILE = "vllm_speculative_config.json"
# vLLM's hf_config_override maps this architecture to its MiMo-V2 MTP draft (separate q/k/v weights).
DRAFT_ARCHITECTURE = "MiMoV2FlashForCausalLM"
_MTP = "model.mtp.layers.0."


class VLLMExportError(ValueError):
    """The module cannot be expressed as vLLM's draft; the message says why and what to do."""


def check_exportable(cfg):
    if cfg.recycle_layers == 0:
        raise VLLMExportError("--vllm needs the recyclable module, but this run has model.recycle_layers = 0")
    scaling = getattr(cfg, "rope_scaling", "none")
    if scaling != "none":
        raise VLLMExportError(f"--vllm: vLLM's MTP draft layer (MiMo-V2) has plain rotary positions, this model "
                              f"has rope_scaling = {scaling!r}; export without --vllm")
    if cfg.recycle_layers != 1:
        raise VLLMExportError(f"--vllm: vLLM's MTP draft layer (MiMo-V2) holds one decoder layer, this module has "
                              f"recycle_layers = {cfg.recycle_layers}; export without --vllm, or train a "
                              "1-layer module for vLLM")


def draft_state_dict(cfg, module: dict) -> dict:
    """Our module in HF names (`recycle.*`, from hf_convert.to_hf) -> vLLM's MiMo-V2 MTP layer names."""
    import torch

    check_exportable(cfg)
    d = cfg.hidden_size
    w_proj = module["recycle.linear_in.weight"]          # [d, 2d] over [RMSNorm_h(h) ; RMSNorm_e(e)]
    out = {_MTP + "hnorm.weight": module["recycle.hidden_norm.weight"],
           _MTP + "enorm.weight": module["recycle.embed_norm.weight"],
           # vLLM concatenates [enorm(e) ; hnorm(h)]: the same map with its two column blocks swapped.
           _MTP + "eh_proj.weight": torch.cat([w_proj[:, d:], w_proj[:, :d]], dim=1),
           _MTP + "final_layernorm.weight": module["recycle.final_norm.weight"]}
    layer = "recycle.layers.0."
    renames = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm"}
    for key, value in module.items():
        if key.startswith(layer):
            name = key[len(layer):]
            head = name.split(".")[0]
            out[_MTP + renames.get(head, head) + name[len(head):]] = value
    return {k: v.contiguous() for k, v in out.items()}


def mtp_fields(cfg) -> dict:
    """The config fields vLLM's MiMo-V2 MTP layer reads. vLLM builds an MTP draft from the *target's*
    config (MTP layers normally ship inside the target checkpoint), so they go into HF_DIR/config.json
    too; LlamaConfig keeps unknown fields and transformers ignores them."""
    return dict(num_nextn_predict_layers=1, layernorm_epsilon=cfg.norm_eps, swa_num_attention_heads=cfg.num_heads,
                swa_num_key_value_heads=cfg.num_kv_heads, swa_head_dim=cfg.head_dim, swa_v_head_dim=cfg.head_dim,
                swa_rope_theta=cfg.rope_theta, sliding_window_size=-1, partial_rotary_factor=1.0,
                attention_bias=False, add_swa_attention_sink_bias=False)


def draft_config(base_config: dict) -> dict:
    """config.json of the draft folder: the target's (with mtp_fields) under the architecture name that
    vLLM's speculative config maps to its MiMo-V2 MTP draft."""
    conf = {k: v for k, v in base_config.items() if k not in ("auto_map", "recycle_layers", "recycle_module_file")}
    conf.update(architectures=[DRAFT_ARCHITECTURE], model_type="llama")
    return conf


def speculative_config(hf_dir: Path, num_speculative_tokens: int = 1) -> dict:
    """The `speculative_config` for vLLM: `LLM(HF_DIR, speculative_config=...)` / `vllm serve --speculative-config`."""
    return {"method": "mtp", "model": str((Path(hf_dir) / DRAFT_DIR).resolve()),
            "num_speculative_tokens": int(num_speculative_tokens)}


def write_vllm_files(tmp: Path, final_dir: Path, cfg, module: dict, base_config: dict, dtype, k: int = 1):
    """Write the draft folder and the speculative config into `tmp`, which will be renamed to `final_dir`.
    `base_config` is HF_DIR/config.json's dict and must already hold mtp_fields(cfg)."""
    from safetensors.torch import save_file

    if k < 1:
        raise VLLMExportError(f"num_speculative_tokens={k} must be >= 1")
    weights = draft_state_dict(cfg, module)
    (tmp / DRAFT_DIR).mkdir()
    save_file({n: w.to(dtype) for n, w in weights.items()}, str(tmp / DRAFT_DIR / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / DRAFT_DIR / "config.json").write_text(json.dumps(draft_config(base_config), indent=2, sort_keys=True))
    (tmp / SPEC_FILE).write_text(json.dumps(speculative_config(final_dir, k), indent=2) + "\n")
