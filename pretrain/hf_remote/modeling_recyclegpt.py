"""RecycleGPT remote code for Hugging Face `transformers` (shipped next to the weights by pretrain.export_hf).

Self-contained: needs only torch, safetensors and transformers. The base is a plain `LlamaForCausalLM`
(model.safetensors); the recyclable module (arXiv 2308.03421) lives in recycle_module.safetensors:

    u_i = W_proj [ RMSNorm_h(h_i) ; RMSNorm_e(E[x_{i+1}]) ]        (2d -> d, no bias)
    g_i = RMSNorm_r( N causal LLaMA decoder layers over u_0 .. u_i, rotary position i + 1 )
    W_out g_i predicts x_{i+2}                                      (E, W_out shared with the base)

`recycle_generate(input_ids, mode="standard"|"recycle"|"verify", max_new_tokens)` decodes greedily:
standard = one full forward per token; recycle = the full model runs on two tokens per forward and the
module supplies every second token unchecked (lossy); verify = the same, but the module's token is checked
against the full model's own prediction and replaced (cache rolled back) on a mismatch: output identical
to standard.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

MODULE_FILE = "recycle_module.safetensors"
MODES = ("standard", "recycle", "verify")


def _drop_last(cache):
    """Forget the newest cached position (transformers 5 crops by a negative count, 4.x to a length)."""
    try:
        cache.crop(-1)
    except (ValueError, TypeError):
        cache.crop(cache.get_seq_length() - 1)


class _RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class _Cache:
    """Per-layer key/value tensors for the module (it never needs a rollback, see recycle_generate)."""

    def __init__(self, n):
        self.k, self.v, self.length = [None] * n, [None] * n, 0

    def update(self, i, k, v):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], 2), torch.cat([self.v[i], v], 2)
        self.k[i], self.v[i] = k, v
        return k, v


class _Layer(nn.Module):
    """One LLaMA decoder layer with HF parameter names (self_attn.q_proj, mlp.gate_proj, ...)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        d, self.hd = c.hidden_size, c.hidden_size // c.num_attention_heads
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.input_layernorm = _RMSNorm(d, c.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(d, c.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, self.heads * self.hd, bias=False)
        self.self_attn.k_proj = nn.Linear(d, self.kv_heads * self.hd, bias=False)
        self.self_attn.v_proj = nn.Linear(d, self.kv_heads * self.hd, bias=False)
        self.self_attn.o_proj = nn.Linear(self.heads * self.hd, d, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(c.intermediate_size, d, bias=False)

    def attention(self, x, cos, sin, cache, idx):
        B, T, _ = x.shape
        a = self.self_attn
        q = _rotate(a.q_proj(x).view(B, T, -1, self.hd).transpose(1, 2), cos, sin)
        k = _rotate(a.k_proj(x).view(B, T, -1, self.hd).transpose(1, 2), cos, sin)
        v = a.v_proj(x).view(B, T, -1, self.hd).transpose(1, 2)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(idx, k, v)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        keep = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return a.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin, cache=None, idx=0):
        x = x + self.attention(self.input_layernorm(x), cos, sin, cache, idx)
        m = self.mlp
        y = self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(y)) * m.up_proj(y))


class RecyclableModule(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        d = c.hidden_size
        self.hidden_norm = _RMSNorm(d, c.rms_norm_eps)
        self.embed_norm = _RMSNorm(d, c.rms_norm_eps)
        self.linear_in = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.recycle_layers))
        self.final_norm = _RMSNorm(d, c.rms_norm_eps)
        self.config, self.inv_freq = c, None

    def rotary(self, start, length, device):
        if self.inv_freq is None:
            # The base's own frequencies (rope scaling included), from transformers: the module must rotate
            # alike. Built on first use, on the CPU: from_pretrained constructs modules on the meta device.
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
            with torch.device("cpu"):
                self.inv_freq = LlamaRotaryEmbedding(self.config).inv_freq.double()
        ang = torch.outer(torch.arange(start, start + length, dtype=torch.float64), self.inv_freq)
        ang = torch.cat([ang, ang], -1)
        return ang.cos().float().to(device), ang.sin().float().to(device)

    def forward(self, h, next_embeds, start_pos=0, cache=None):
        u = self.linear_in(torch.cat([self.hidden_norm(h), self.embed_norm(next_embeds)], -1))
        cos, sin = self.rotary(start_pos + 1, h.shape[1], h.device)   # state i stands for token i + 1
        for idx, layer in enumerate(self.layers):
            u = layer(u, cos, sin, cache, idx)
        if cache is not None:
            cache.length += h.shape[1]
        return self.final_norm(u)


class RecycleGPTForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM (forward, generate unchanged) + the recyclable module + `recycle_generate`."""

    config_class = LlamaConfig
    _keys_to_ignore_on_load_missing = [r"^recycle\."]

    def __init__(self, config):
        super().__init__(config)
        self.recycle = RecyclableModule(config) if getattr(config, "recycle_layers", 0) else None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if model.recycle is not None:
            model.load_recycle_module(pretrained_model_name_or_path, **{
                k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs})
        return model

    def load_recycle_module(self, path, **hub_kwargs):
        from safetensors.torch import load_file

        file = os.path.join(str(path), MODULE_FILE)
        if not os.path.isfile(file):
            from transformers.utils import cached_file
            file = cached_file(str(path), MODULE_FILE, **hub_kwargs)
        state = {k.removeprefix("recycle."): v for k, v in load_file(file).items()}
        p = self.lm_head.weight
        self.recycle.to(device=p.device)
        self.recycle.load_state_dict(state, strict=True)
        self.recycle.to(dtype=p.dtype)

    # ------------------------------------------------------------------------------------ decoding
    def _base(self, ids, cache):
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state

    def _module(self, h, next_ids, cache):
        return self.recycle(h, self.model.embed_tokens(next_ids), cache.length, cache)

    def _argmax(self, states):
        return self.lm_head(states[0]).argmax(-1).tolist()

    @torch.inference_mode()
    def recycle_generate(self, input_ids, mode: str = "standard", max_new_tokens: int = 64,
                         eos_token_id: int | None = None) -> torch.LongTensor:
        """Greedy continuation of one prompt ([1, P] or [P] ids); returns [1, P + new] like `generate`."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if mode != "standard" and self.recycle is None:
            raise ValueError(f"mode {mode!r} needs the recyclable module (recycle_layers = 0); use 'standard'")
        dev = self.lm_head.weight.device
        prompt = torch.as_tensor(input_ids, dtype=torch.long, device=dev).view(1, -1)
        out: list[int] = []

        def emit(t):
            out.append(t)
            return len(out) >= max_new_tokens or t == eos_token_id

        def ids(*t):
            return torch.tensor([list(t)], dtype=torch.long, device=dev)

        base_cache = DynamicCache(config=self.config)
        h = self._base(prompt, base_cache)
        last = self._argmax(h[:, -1:])[0]
        if emit(last):
            return torch.cat([prompt, ids(*out)], 1)
        if mode == "standard":
            while True:
                last = self._argmax(self._base(ids(last), base_cache))[0]
                if emit(last):
                    break
            return torch.cat([prompt, ids(*out)], 1)
        mod_cache = _Cache(len(self.recycle.layers))
        # Module prefill over every prompt position i with next token x_{i+1} (x_n at the last).
        g = self._module(h, torch.cat([prompt[:, 1:], ids(last)], 1), mod_cache)
        guess = self._argmax(g[:, -1:])[0]
        if mode == "recycle":
            if emit(guess):
                return torch.cat([prompt, ids(*out)], 1)
            while True:
                h = self._base(ids(last, guess), base_cache)
                token = self._argmax(h[:, -1:])[0]
                if emit(token):
                    break
                g = self._module(h, ids(guess, token), mod_cache)
                last, guess = token, self._argmax(g[:, -1:])[0]
                if emit(guess):
                    break
            return torch.cat([prompt, ids(*out)], 1)
        while True:  # verify
            h = self._base(ids(last, guess), base_cache)
            check, after = self._argmax(h)
            if check == guess:
                if emit(guess) or emit(after):
                    break
                g = self._module(h, ids(guess, after), mod_cache)
                last = after
            else:
                _drop_last(base_cache)   # the slot holding the wrong guess (h_{n+1} came from it too)
                if emit(check):
                    break
                g = self._module(h[:, :1], ids(check), mod_cache)
                last = check
            guess = self._argmax(g[:, -1:])[0]
        return torch.cat([prompt, ids(*out)], 1)
