"""The recyclable module against an independent reference written out from DESIGN.md §1, position by position,
in float64 with plain tensor ops (no model/ code, only its parameters):

    u_i = W_proj [ RMSNorm_h(h_i) ; RMSNorm_e(E[x_{i+1}]) ]
    N decoder layers, causal self-attention over u_0 .. u_i, rotary position i + 1
    g_i = RMSNorm_r(...);  W_out g_i predicts x_{i+2}

Rotary embeddings only see relative positions inside attention, so the module's outputs cannot tell "position
i + 1" from "position i" when every position shifts together. The absolute position is visible in what the
module leaves in its KV cache (each key rotated by its own position), which decoding keeps across steps and
drafts: the reference checks those keys too, so `rotary(start_pos + 1, T)` -> `rotary(start_pos, T)` in
model/recycle.py fails here.
"""
import math

import torch

from model import ModelConfig, RecycleGPT

CFG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                  max_seq_len=32, recycle_layers=2, rope_theta=500.0)


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean() + eps)


def rope(x, position, theta):
    """Rotate-half rotary embedding of one head vector x at an absolute position (LLaMA's convention): pair j
    is (x[j], x[j + hd/2]), turned by the angle position * theta^(-2j/hd)."""
    hd = x.shape[0]
    out = x.clone()
    for j in range(hd // 2):
        angle = position * theta ** (-2 * j / hd)
        a, b = x[j], x[j + hd // 2]
        out[j] = a * math.cos(angle) - b * math.sin(angle)
        out[j + hd // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def reference_module(params, h, next_ids, cfg):
    """(g [T, d], keys per layer [layer][kv_head][position] -> vector) for one sequence."""
    p = {k: v.double() for k, v in params.items()}
    hd, heads, kv_heads, eps = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.norm_eps
    T = h.shape[0]
    u = [p["recycle.linear_in.weight"] @ torch.cat([rms_norm(h[i], p["recycle.hidden_norm.weight"], eps),
                                                    rms_norm(p["embedding.weight"][next_ids[i]],
                                                             p["recycle.embed_norm.weight"], eps)])
         for i in range(T)]
    keys = []
    for layer in range(cfg.recycle_layers):
        w = {k[len(f"recycle.layers.{layer}."):]: v for k, v in p.items() if k.startswith(f"recycle.layers.{layer}.")}
        wq, wk, wv = w["self_attention.linear_qkv.weight"].split([heads * hd, kv_heads * hd, kv_heads * hd])
        x = [rms_norm(u[i], w["input_norm.weight"], eps) for i in range(T)]
        # the state at position i stands for token i + 1: rotary position i + 1, for queries and keys alike
        q = [[rope((wq @ x[i])[n * hd:(n + 1) * hd], i + 1, cfg.rope_theta) for n in range(heads)] for i in range(T)]
        k = [[rope((wk @ x[i])[n * hd:(n + 1) * hd], i + 1, cfg.rope_theta) for n in range(kv_heads)]
             for i in range(T)]
        v = [[(wv @ x[i])[n * hd:(n + 1) * hd] for n in range(kv_heads)] for i in range(T)]
        keys.append([[k[i][n] for i in range(T)] for n in range(kv_heads)])
        new_u = []
        for i in range(T):
            heads_out = []
            for n in range(heads):
                g = n // (heads // kv_heads)   # grouped-query attention: query head n reads key/value head g
                scores = torch.stack([q[i][n] @ k[j][g] for j in range(i + 1)]) / math.sqrt(hd)
                weights = torch.softmax(scores, dim=0)
                heads_out.append(sum(weights[j] * v[j][g] for j in range(i + 1)))
            a = u[i] + w["self_attention.linear_proj.weight"] @ torch.cat(heads_out)
            m = rms_norm(a, w["pre_mlp_norm.weight"], eps)
            gate, up = (w["mlp.linear_fc1.weight"] @ m).split(cfg.ffn_hidden_size)
            new_u.append(a + w["mlp.linear_fc2.weight"] @ (torch.nn.functional.silu(gate) * up))
        u = new_u
    g = torch.stack([rms_norm(u[i], p["recycle.final_norm.weight"], eps) for i in range(T)])
    return g, keys


def test_module_matches_the_written_out_definition():
    torch.manual_seed(0)
    model = RecycleGPT(CFG).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):   # randomised so a swapped or skipped norm shows
                param.uniform_(0.5, 1.5)
    params = dict(model.named_parameters())
    assert all(not name.endswith(".bias") for name in params)   # the reference has no biases
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.hidden(ids)                     # the full model's states (checked against HF elsewhere)
        _, cache = model.new_caches(1, 16)
        g = model.module_step(h[:, :-1], ids[:, 1:], cache)
        rec_logits = model.logits(g)
    want_g, want_keys = reference_module(params, h[0, :-1].double(), ids[0, 1:], CFG)
    assert torch.allclose(g[0].double(), want_g, atol=1e-5, rtol=0), (g[0].double() - want_g).abs().max()
    want_logits = want_g @ params["lm_head.weight"].double().T      # W_out g_i predicts x_{i+2}
    assert torch.allclose(rec_logits[0].double(), want_logits, atol=1e-4, rtol=0)
    T = ids.shape[1] - 1
    for layer in range(CFG.recycle_layers):
        for n in range(CFG.num_kv_heads):
            got = cache.keys[layer][0, n, :T].double()
            want = torch.stack(want_keys[layer][n])
            assert torch.allclose(got, want, atol=1e-5, rtol=0), \
                f"layer {layer}, kv head {n}: cached keys are not at rotary positions 1..{T}"
