"""`pretrain.export_hf --vllm`: the module as vLLM's MTP draft (pretrain/vllm_export.py, docs/serving.md).

The tests that run vLLM itself need its separate environment (`make vllm-env`, .venv-vllm); without it they
skip, unless RECYCLEGPT_REQUIRE_VLLM=1 makes a missing environment a failure (for machines that must run them).
"""
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, cli

VLLM_PYTHON = Path(os.environ.get("RECYCLEGPT_VLLM_PYTHON", ROOT / ".venv-vllm/bin/python"))


def needs_vllm():
    if VLLM_PYTHON.is_file():
        return
    if os.environ.get("RECYCLEGPT_REQUIRE_VLLM") == "1":
        pytest.fail(f"RECYCLEGPT_REQUIRE_VLLM=1 but {VLLM_PYTHON} does not exist; run `make vllm-env`")
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (`make vllm-env` creates it)")


@pytest.fixture(scope="module")
def drafting_export(tmp_path_factory):
    """An export with a predictable base and a module that drafts it, built without training (the suite
    has no minutes for it). Base: its layers' outputs shrunk so h_i ~ RMSNorm(E[x_i]), and W_out[v] = E[v-1],
    so it continues x, x+1, x+2, ... Module: W_proj = [0 | I] passes RMSNorm_e(E[x_{i+1}]) on, so it drafts
    x_{i+1} + 1 = x_{i+2}: every draft right when the wiring is right, while a module fed the two halves
    the other way round (the concat order vLLM's layer uses) drafts x_{i+1} and is never right."""
    from model import ModelConfig
    from model.gpt import RecycleGPT
    from pretrain.export_hf import write_hf_dir

    torch.manual_seed(0)
    model = RecycleGPT(ModelConfig(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                                   ffn_hidden_size=256)).eval()
    d = model.cfg.hidden_size
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.roll(model.embedding.weight, 1, 0))
        for layer in model.layers:
            layer.self_attention.linear_proj.weight.mul_(0.1)
            layer.mlp.linear_fc2.weight.mul_(0.1)
        w = model.recycle.linear_in.weight
        w.zero_()
        w[:, d:] = torch.eye(d)
    out = tmp_path_factory.mktemp("vllm_drafting") / "hf"
    out.mkdir()
    write_hf_dir(out, model.cfg, model.state_dict(), "fp32", ROOT / "assets/tokenizers/sotu-bpe-8k", out, 1)
    return out


def mtp_reference(w: dict, cfg, h, e, theta: float):
    """vLLM's MiMo-V2 MTP layer as its docs and checkpoint names describe it, written out independently:
    x = eh_proj[enorm(e); hnorm(h)], one pre-norm decoder layer with rotary position i (not i + 1), then
    final_layernorm. h, e: [T, d]."""
    def rms(x, name):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        return w[f"model.mtp.layers.0.{name}.weight"] * normed

    def lin(x, name):
        return x @ w[f"model.mtp.layers.0.{name}.weight"].T

    T, hd = h.shape[0], cfg.head_dim
    x = lin(torch.cat([rms(e, "enorm"), rms(h, "hnorm")], -1), "eh_proj")
    a = rms(x, "input_layernorm")
    q = lin(a, "self_attn.q_proj").view(T, -1, hd)
    k = lin(a, "self_attn.k_proj").view(T, -1, hd)
    v = lin(a, "self_attn.v_proj").view(T, -1, hd)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)           # positions 0 .. T-1
    cos, sin = torch.cat([ang, ang], -1).cos().float()[:, None], torch.cat([ang, ang], -1).sin().float()[:, None]

    def rot(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    q, k = rot(q), rot(k)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    x = x + lin(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, -1), "self_attn.o_proj")
    m = rms(x, "pre_mlp_layernorm")
    x = x + lin(torch.nn.functional.silu(lin(m, "mlp.gate_proj")) * lin(m, "mlp.up_proj"), "mlp.down_proj")
    return rms(x, "final_layernorm")


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    """An untrained tiny-preset model written by the exporter's own writer with the vLLM files."""
    from model import ModelConfig
    from model.gpt import RecycleGPT
    from pretrain.export_hf import write_hf_dir

    torch.manual_seed(0)
    model = RecycleGPT(ModelConfig()).eval()
    out = tmp_path_factory.mktemp("vllm_random") / "hf"
    out.mkdir()
    write_hf_dir(out, model.cfg, model.state_dict(), "fp32", ROOT / "assets/tokenizers/sotu-bpe-8k", out, 1)
    return model, out


def test_draft_weights_compute_our_module(random_export):
    """The draft folder, run as vLLM's layer is wired (other concat order, position i), gives our g exactly."""
    from safetensors.torch import load_file

    from pretrain.vllm_export import DRAFT_ARCHITECTURE, DRAFT_DIR

    model, hf = random_export
    w = load_file(str(hf / DRAFT_DIR / "model.safetensors"))
    assert all(k.startswith("model.mtp.layers.0.") for k in w)         # embedding and head come from the target
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.hidden(ids)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        want = model.recycle_hidden(h, nxt)[0]
        got = mtp_reference(w, model.cfg, h[0], model.embedding(nxt)[0], model.cfg.rope_theta)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    draft = json.loads((hf / DRAFT_DIR / "config.json").read_text())
    target = json.loads((hf / "config.json").read_text())
    assert draft["architectures"] == [DRAFT_ARCHITECTURE] and target["architectures"] == ["LlamaForCausalLM"]
    assert target["swa_head_dim"] == model.cfg.head_dim and target["layernorm_epsilon"] == model.cfg.norm_eps
    spec = json.loads((hf / "vllm_speculative_config.json").read_text())
    assert spec == {"method": "mtp", "model": str((hf / DRAFT_DIR).resolve()), "num_speculative_tokens": 1}
    # vLLM reads every *.safetensors of a folder unless an index names the base's files alone.
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert not any(k.startswith("recycle.") for k in index["weight_map"])


def test_vllm_export_refuses_a_module_vllm_cannot_hold(tmp_path, capsys):
    """recycle_layers = 2 has no vLLM MTP equivalent: one error line, exit 2, before any weights are read."""
    import yaml

    from pretrain.export_hf import main as export_main

    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)        # no weights: the refusal must come first
    (run / "checkpoints" / "latest").write_text("step_1")
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["model"]["overrides"] = {"recycle_layers": 2}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert export_main(["--checkpoint", str(run), "--output", str(tmp_path / "hf"), "--vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --vllm:") and "recycle_layers = 2" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_vllm_serves_the_export_with_our_module_as_draft(drafting_export, tmp_path):
    """Real vLLM: base text equals our standard, the draft leaves it unchanged, and vLLM's acceptance
    rate equals our verify's (same drafts, same checks) within 5 points."""
    needs_vllm()
    out = tmp_path / "check.json"
    proc = cli("benchmarks/vllm_check.py", "--model", str(drafting_export), "--prompts", "3", "--prompt-len", "16",
               "--max-new-tokens", "32", "--rounds", "1", "--vllm-python", str(VLLM_PYTHON), "--output", str(out),
               check=False, timeout=1500)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["checks"]["a_base_equals_standard"], result["first_difference"]
    assert result["checks"]["b_draft_text_unchanged"], result["first_difference"]
    acc = result["acceptance"]
    assert acc["ours_accepted"] > 0 and acc["vllm_accepted_tokens"] > 0, acc     # the draft is really used
    assert result["checks"]["b_acceptance_within_tolerance"], acc
    assert proc.returncode == 0, proc.stdout[-3000:]
