"""RecycleGPT remote code for Hugging Face `transformers` (shipped next to the weights by pretrain.export_hf).

The base is a plain `LlamaForCausalLM` (model.safetensors); the recyclable module (arXiv 2308.03421) lives in
recycle_module.safetensors and is built from transformers' own Llama parts:

    u_i = W_proj [ RMSNorm_h(h_i) ; RMSNorm_e(E[x_{i+1}]) ]        (2d -> d, no bias)
    g_i = RMSNorm_r( N causal LlamaDecoderLayers over u_0 .. u_i, rotary position i + 1 )
    W_out g_i predicts x_{i+2}                                      (E, W_out and the rotary shared with the base)

`recycle_generate` runs the project's own decode loop (decoding.py and the files it imports, copied beside this
file at export time; they need only torch): modes standard / recycle / verify, draft_len k or "auto", sampling
(lossless in verify by speculative sampling), batches, and the folder's draft vocabulary (draft_vocab.safetensors,
when the run trained the module over one: its logits are drafted over those tokens only, as `inference.generate`
does). This file only adapts the model to the interface that loop calls: new_caches, base_step, module_step,
draft_step, logits, cfg, spec, recycle.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from .decoding import generate_batch
from .draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from .draft_vocab import DraftVocab
from .kv_cache import KVCache
from .sampling import Sampling

MODULE_FILE = "recycle_module.safetensors"


class _CacheView:
    """Our KVCache (kv_cache.py: per-row lengths, rollback) as the one method transformers' attention calls."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def update(self, key, value, layer_idx, *args, **kwargs):
        return self.cache.write(layer_idx, key, value)


def run_layers(layers, x, rotary, cache: KVCache, offset: int = 0):
    """LlamaDecoderLayers over x [B, T, d], the new positions of every row of `cache`; row b's token j sits at
    rotary position lengths[b] + j + offset. Writes the keys/values, then advances the cache once."""
    B, T, _ = x.shape
    positions = torch.tensor(cache.lengths, device=x.device)[:, None] + offset + torch.arange(T, device=x.device)
    position_embeddings = rotary(x, positions)
    mask = cache.causal_mask(T) if T > 1 or not cache.uniform else None
    if mask is not None and layers[0].self_attn.config._attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
    view = _CacheView(cache)
    for layer in layers:
        # cache positionally: transformers 4.x names it past_key_values, 5.x cache
        x = layer(x, mask, positions, view, position_embeddings=position_embeddings)
    cache.advance(T)
    return x


class RecyclableModule(nn.Module):
    """State-dict keys as pretrain/hf_convert.py writes them: hidden_norm, embed_norm, linear_in, layers.N.*
    (LlamaDecoderLayer names), final_norm."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        d = c.hidden_size
        self.hidden_norm = LlamaRMSNorm(d, c.rms_norm_eps)     # RMSNorm_h
        self.embed_norm = LlamaRMSNorm(d, c.rms_norm_eps)      # RMSNorm_e
        self.linear_in = nn.Linear(2 * d, d, bias=False)       # W_proj
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, layer_idx=i) for i in range(c.recycle_layers))
        self.final_norm = LlamaRMSNorm(d, c.rms_norm_eps)      # RMSNorm_r

    def forward(self, h, next_embeds, rotary, cache: KVCache):
        """h, next_embeds [B, T, d] for the next T positions of `cache`; returns g (same shape)."""
        u = self.linear_in(torch.cat([self.hidden_norm(h), self.embed_norm(next_embeds)], dim=-1))
        # The module's state at position i stands for token i + 1, hence rotary position i + 1.
        return self.final_norm(run_layers(self.layers, u, rotary, cache, offset=1))


class RecycleGPTForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM (forward, generate unchanged) + the recyclable module + `recycle_generate`."""

    config_class = LlamaConfig
    _keys_to_ignore_on_load_missing = [r"^recycle\."]

    def __init__(self, config):
        super().__init__(config)
        self.recycle = RecyclableModule(config) if getattr(config, "recycle_layers", 0) else None
        self.draft_vocab: DraftVocab | None = None     # the folder's, read by from_pretrained

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if model.recycle is not None:
            hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            model.load_recycle_module(pretrained_model_name_or_path, **hub_kwargs)
            model.load_draft_vocab(pretrained_model_name_or_path, **hub_kwargs)
        return model

    @staticmethod
    def _folder_file(path, name: str, required: bool, **hub_kwargs) -> str | None:
        """`name` in a local folder or a Hub repository; None when it is missing and not `required`."""
        file = os.path.join(str(path), name)
        if os.path.isfile(file):
            return file
        if os.path.isdir(str(path)) and not required:
            return None
        from transformers.utils import cached_file
        return cached_file(str(path), name, _raise_exceptions_for_missing_entries=required, **hub_kwargs)

    def load_draft_vocab(self, path, **hub_kwargs):
        """The run's draft vocabulary when the folder has one (export_hf copies it): the module learned logits
        over those tokens only. Decoding drafts over it unless recycle_generate(..., use_draft_vocab=False)."""
        file = self._folder_file(path, DRAFT_VOCAB_FILE, False, **hub_kwargs)
        self.draft_vocab = None if file is None else DraftVocab.load(file, self.config.vocab_size)

    def load_recycle_module(self, path, **hub_kwargs):
        from safetensors.torch import load_file

        file = self._folder_file(path, MODULE_FILE, True, **hub_kwargs)
        state = {k.removeprefix("recycle."): v for k, v in load_file(file).items()}
        p = self.lm_head.weight
        self.recycle.to(device=p.device)
        self.recycle.load_state_dict(state, strict=True)
        self.recycle.to(dtype=p.dtype)

    # ------------------------------------------------------------- the interface decoding.py calls on a model
    @property
    def cfg(self):
        """The fields of our ModelConfig the loop reads."""
        c = self.config
        return SimpleNamespace(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                               max_seq_len=c.max_position_embeddings)

    @property
    def spec(self):
        """One process: no tensor parallelism (DraftVocab.logits reads tp_size)."""
        return SimpleNamespace(tp_size=1)

    def _cache(self, layers: int, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        c, p = self.config, self.lm_head.weight
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return KVCache(layers, batch, c.num_key_value_heads, max_len, head_dim, dtype or p.dtype, device or p.device)

    def new_caches(self, batch: int, max_len: int, dtype=None, device=None):
        """One KV cache for the base, one for the module (None without one)."""
        base = self._cache(self.config.num_hidden_layers, batch, max_len, dtype, device)
        module = None if self.recycle is None else self._cache(len(self.recycle.layers), batch, max_len, dtype, device)
        return base, module

    def base_step(self, input_ids, cache: KVCache):
        x = run_layers(self.model.layers, self.model.embed_tokens(input_ids), self.model.rotary_emb, cache)
        return self.model.norm(x)

    def module_step(self, h, next_ids, cache: KVCache):
        return self.recycle(h, self.model.embed_tokens(next_ids), self.model.rotary_emb, cache)

    def draft_step(self, state, next_ids, cache: KVCache | None = None):
        """One module depth (`state`: h, or the previous depth's g); without a cache, positions 0 .. T-1."""
        if cache is None:
            cache = self._cache(len(self.recycle.layers), state.shape[0], state.shape[1], state.dtype, state.device)
        return self.module_step(state, next_ids, cache)

    def logits(self, states):
        return self.lm_head(states)

    # ---------------------------------------------------------------------------------------- generation
    def recycle_generate(self, input_ids, mode: str = "standard", max_new_tokens: int = 64,
                         eos_token_id: int | None = None, *, attention_mask=None, draft_len=1,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                         max_auto_draft_len: int = 4, pad_token_id: int | None = None, return_stats: bool = False,
                         use_draft_vocab: bool = True):
        """Continue input_ids ([P], or [B, P] with an optional attention_mask marking the real tokens of padded
        rows); returns [B, P + N] like `generate`: each row as given, then its new tokens, rows that stopped
        early padded with pad_token_id (default: the config's, else eos). mode: standard | recycle | verify;
        draft_len: tokens drafted per verify cycle, or "auto"; temperature > 0 samples (top_k, top_p, seed).
        The module drafts over the folder's draft vocabulary when it has one (use_draft_vocab=False: all tokens).
        Greedy fp32 verify equals standard token for token; each row of a batch equals its batch-1 output.
        With return_stats: (ids, per-row DecodeStats: full_forwards, tau, acceptance_rate, tokens_per_s)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        ids = ids.view(1, -1) if ids.dim() == 1 else ids
        keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else \
            torch.as_tensor(attention_mask).cpu().view(ids.shape).bool()
        prompts = [row[m].tolist() for row, m in zip(ids, keep)]
        out = generate_batch(self, prompts, mode, max_new_tokens, eos_token_id, draft_len=draft_len,
                             sampling=Sampling(temperature, top_k, top_p, seed), max_auto_draft_len=max_auto_draft_len,
                             draft_vocab=self.draft_vocab if use_draft_vocab else None)
        if pad_token_id is None:
            pad_token_id = next((t for t in (self.config.pad_token_id, eos_token_id, self.config.eos_token_id)
                                 if isinstance(t, int)), 0)
        width = max(len(r.tokens) for r in out.rows)
        new = torch.tensor([r.tokens + [pad_token_id] * (width - len(r.tokens)) for r in out.rows], dtype=torch.long)
        result = torch.cat([ids, new], dim=1).to(self.lm_head.weight.device)
        return (result, out.stats) if return_stats else result
