"""Model math on one process: HF parity, KV caches, the module's alignment, depth 0, presets."""
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, RecycleGPT, RecycleObjective, preset
from pretrain.hf_convert import from_hf, llama_config_kwargs, to_hf

SMALL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=160, max_seq_len=64, recycle_layers=2)


def make_model(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    model = RecycleGPT(cfg).eval()
    # Norm weights start at 1; randomise them so a swapped norm cannot pass the parity test.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tokens(batch=2, length=17, vocab=512, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_parity_with_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = make_model()
    base_sd, module_sd = to_hf(SMALL, model.state_dict())
    hf = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(SMALL))).eval()
    missing, unexpected = hf.load_state_dict(base_sd, strict=True)
    assert not missing and not unexpected
    ids = tokens()
    with torch.no_grad():
        ours = model.logits(model.hidden(ids))
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    # The key map is a bijection: back from HF gives every tensor of ours unchanged.
    back = from_hf(SMALL, base_sd, module_sd)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_kv_cache_forward_equals_full_forward():
    model = make_model()
    ids = tokens(length=12)
    with torch.no_grad():
        h_full = model.hidden(ids)
        g_full = model.recycle_hidden(h_full[:, :-1], ids[:, 1:])
        base_cache, module_cache = model.new_caches(batch=2, max_len=16)
        # Prefill 5, then one token, then chunks of 2 (the recycle cycle), then singles.
        steps = [(0, 5), (5, 6), (6, 8), (8, 10), (10, 11)]
        hs, gs = [], []
        for a, b in steps:
            h = model.base_step(ids[:, a:b], base_cache)
            hs.append(h)
            gs.append(model.module_step(h, ids[:, a + 1:b + 1], module_cache))
    assert base_cache.length == module_cache.length == 11
    torch.testing.assert_close(torch.cat(hs, 1), h_full[:, :11], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(gs, 1), g_full, atol=1e-5, rtol=1e-5)


def test_kv_cache_rollback_then_rewrite():
    model = make_model()
    ids = tokens(length=8)
    with torch.no_grad():
        h_full = model.hidden(ids)
        cache, _ = model.new_caches(batch=2, max_len=8)
        model.base_step(ids[:, :6], cache)
        cache.rollback(2)  # forget positions 4,5; write other tokens there, then the right ones
        model.base_step(torch.zeros_like(ids[:, 4:6]), cache)
        cache.rollback(2)
        h = model.base_step(ids[:, 4:8], cache)
    torch.testing.assert_close(h, h_full[:, 4:], atol=1e-5, rtol=1e-5)


def test_draft_step_depths_with_their_own_caches_equal_a_cache_free_unroll():
    # Depth j at position i reads g^(j-1)_i and E[x_{i+j}] and attends to depth-j states 0..i (model/recycle.py).
    # Decoded incrementally, one cache per depth, in uneven chunks, it must equal one pass per depth.
    model = make_model()
    ids = tokens(length=12)
    with torch.no_grad():
        h = model.hidden(ids)
        ref = [h[:, :9]]
        for j in (1, 2, 3):
            ref.append(model.draft_step(ref[-1], ids[:, j:9 + j]))
        caches = [model.new_caches(batch=2, max_len=12)[1] for _ in range(3)]
        got = [[], [], []]
        for a, b in [(0, 4), (4, 5), (5, 8), (8, 9)]:
            state = h[:, a:b]
            for j in (1, 2, 3):
                state = model.draft_step(state, ids[:, a + j:b + j], caches[j - 1])
                got[j - 1].append(state)
    assert [c.length for c in caches] == [9, 9, 9]
    for j in (1, 2, 3):
        torch.testing.assert_close(torch.cat(got[j - 1], 1), ref[j], atol=1e-5, rtol=1e-5)


def reference_recycle_loss(model, ids, input_shift=1, target_shift=2):
    """Position by position, from prefixes only: h_i from x_0..x_i, module on (h_j, x_{j+shift})."""
    T = ids.shape[1]
    losses = []
    with torch.no_grad():
        for i in range(T - target_shift):
            h = model.hidden(ids[:, :i + 1])
            nxt = ids[:, input_shift:i + 1 + input_shift]
            g = model.recycle_hidden(h, nxt)[:, -1]
            losses.append(F.cross_entropy(model.logits(g), ids[:, i + target_shift], reduction="none"))
    return torch.stack(losses, 1).mean()


def test_module_alignment_sees_next_token_and_targets_the_one_after():
    model = make_model()
    ids = tokens(length=10)
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:])
    right = reference_recycle_loss(model, ids)
    torch.testing.assert_close(out.recycle_loss, right, atol=1e-5, rtol=1e-5)
    # A wrong shift (module reading x_i, or targeting x_{i+1}) gives a different loss.
    for wrong in (dict(input_shift=0, target_shift=2), dict(input_shift=1, target_shift=1)):
        assert not torch.allclose(out.recycle_loss, reference_recycle_loss(model, ids, **wrong), atol=1e-3)


def test_module_state_depends_on_next_token_but_not_on_the_target():
    model = make_model()
    ids = tokens(batch=1, length=10)
    i = 4
    def g_at_i(seq):
        with torch.no_grad():
            return model.recycle_hidden(model.hidden(seq[:, :-1]), seq[:, 1:])[:, i]
    changed_target, changed_next = ids.clone(), ids.clone()
    changed_target[0, i + 2] = (ids[0, i + 2] + 1) % 512
    changed_next[0, i + 1] = (ids[0, i + 1] + 1) % 512
    assert torch.equal(g_at_i(ids), g_at_i(changed_target))
    assert not torch.allclose(g_at_i(ids), g_at_i(changed_next))


def test_loss_is_lm_plus_lambda_recycle_and_detach_trains_only_the_module():
    model = make_model().train()
    ids = tokens()
    model.objective = RecycleObjective(weight=0.5)
    out = model(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.recycle_loss)
    model.freeze_base()
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("recycle."), name


def test_depth_zero_is_a_plain_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig(**{**SMALL.to_dict(), "recycle_layers": 0})
    model = make_model(cfg)
    assert model.recycle is None
    assert not any(k.startswith("recycle.") for k in model.state_dict())
    ids = tokens()
    hf = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg))).eval()
    hf.load_state_dict(to_hf(cfg, model.state_dict())[0])
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:])
        ref = hf(ids, labels=ids).loss  # HF shifts labels itself: the same T-1 predictions
    assert out.recycle_loss is None and torch.equal(out.loss, out.lm_loss)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)


def test_1p3b_preset_module_overhead_matches_the_paper():
    counts = preset("1.3b").num_parameters()
    overhead = counts["recycle"] / counts["base"]
    print(f"\n1.3b preset: base {counts['base'] / 1e9:.3f}B, module {counts['recycle'] / 1e6:.1f}M, "
          f"overhead {overhead:.1%}")
    assert 0.13 <= overhead <= 0.17


def test_parameter_count_formula_matches_a_built_model():
    model = RecycleGPT(SMALL)
    assert sum(p.numel() for p in model.parameters()) == SMALL.num_parameters()["total"]


@pytest.mark.parametrize("bad", [dict(num_heads=5), dict(num_kv_heads=3), dict(recycle_layers=-1)])
def test_bad_model_config_names_the_problem(bad):
    with pytest.raises(ValueError, match="model config"):
        ModelConfig(**{**SMALL.to_dict(), **bad})
