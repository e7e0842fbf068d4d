"""Decoding modes against cache-free references (DESIGN.md §2).

The references recompute everything from scratch with `model.hidden` / `model.recycle_hidden` at every
step, so a position, cache-length or rollback bug in inference/decoding.py shows up as a token mismatch.
"""
import math

import pytest
import torch

from inference.decoding import DecodingError, greedy_generate
from model import ModelConfig, RecycleGPT

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=160, max_seq_len=96, recycle_layers=2)


pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [[5], [17, 3, 99, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], list(range(200, 230))]


def random_model(seed=0, cfg=CFG, std=0.15):
    torch.manual_seed(seed)
    model = RecycleGPT(cfg).eval()
    with torch.no_grad():
        # Larger weights than the 0.02 init so the layers matter and greedy output is not a fixed point
        # (much larger and the softmaxes underflow into denormals, which makes CPU matmuls crawl).
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, std)
    return model


def mirror_module(model):
    """A module that is often right: a copy of the base's layers run on E[x_{i+1}] at rotary position i+1,
    i.e. the full model over x_1 .. x_{i+1} (only x_0 is missing), so g_i ~ h_{i+1}. W_proj = [0 | I] and
    embedding rows of unit RMS make u_i = E[x_{i+1}] exactly. Needs recycle_layers == num_layers."""
    d = model.cfg.hidden_size
    with torch.no_grad():
        emb = model.embedding.weight
        emb.div_(emb.pow(2).mean(-1, keepdim=True).sqrt())
        model.recycle.linear_in.weight.copy_(torch.cat([torch.zeros(d, d), torch.eye(d)], dim=1))
        for src, dst in zip(model.layers, model.recycle.layers, strict=True):
            dst.load_state_dict(src.state_dict())
        model.recycle.final_norm.load_state_dict(model.final_norm.state_dict())
    return model


def perfect_module(model):
    """Base layers switched off (output projections zeroed): the full model is a bigram model, h_{i+1} =
    RMSNorm(E[x_{i+1}]), and the mirror module computes exactly that, so every guess is right."""
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attention.linear_proj.weight.zero_()
            layer.mlp.linear_fc2.weight.zero_()
    return mirror_module(model)


MODULES = {"random": lambda m: m, "mirror": mirror_module, "perfect": perfect_module}


def reference_standard(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            h = model.hidden(torch.tensor([seq]))
            seq.append(int(model.logits(h[0, -1]).argmax()))
    return seq[len(prompt):]


def reference_recycle(model, prompt, n):
    """The alternating schedule, recomputed from scratch: full model's token, then the module's token."""
    seq = list(prompt)
    with torch.no_grad():
        while len(seq) - len(prompt) < n:
            ids = torch.tensor([seq])
            h = model.hidden(ids)
            seq.append(int(model.logits(h[0, -1]).argmax()))          # h at the last position: next token
            if len(seq) - len(prompt) == n:
                break
            # Module at every position i with next token x_{i+1}; its last state guesses the token after.
            g = model.recycle_hidden(h, torch.tensor([seq[1:]]))
            seq.append(int(model.logits(g[0, -1]).argmax()))
    return seq[len(prompt):]


def reference_verify(model, prompt, n):
    """Verify's accept/reject sequence, from scratch: returns (tokens, accepted, proposed). The module's
    guess is always computed over the verified sequence only, which is what a correct cache holds."""
    seq, accepted, proposed = list(prompt), 0, 0
    with torch.no_grad():
        h = model.hidden(torch.tensor([seq]))
        seq.append(int(model.logits(h[0, -1]).argmax()))
        while len(seq) - len(prompt) < n:
            h = model.hidden(torch.tensor([seq]))
            g = model.recycle_hidden(h[:, :-1], torch.tensor([seq[1:]]))   # g at the second newest position
            guess, check = int(model.logits(g[0, -1]).argmax()), int(model.logits(h[0, -1]).argmax())
            proposed += 1
            seq.append(check)
            if guess == check:
                accepted += 1
                if len(seq) - len(prompt) < n:
                    seq.append(int(model.logits(model.hidden(torch.tensor([seq]))[0, -1]).argmax()))
    return seq[len(prompt):], accepted, proposed


@pytest.mark.parametrize("module", sorted(MODULES))
def test_verify_equals_standard_token_for_token(module):
    model = MODULES[module](random_model())
    accepted = proposed = 0
    for prompt in PROMPTS:
        n = 40
        std = greedy_generate(model, prompt, "standard", n)
        ver = greedy_generate(model, prompt, "verify", n)
        assert std.tokens == reference_standard(model, prompt, n)
        assert ver.tokens == std.tokens, (module, prompt)
        assert std.stats.full_forwards == n and std.stats.tau == 1.0
        # Each verify cycle emits 2 tokens (accept) or 1 (reject); prefill emits 1.
        s = ver.stats
        assert s.full_forwards == 1 + s.proposed
        assert s.new_tokens <= 1 + 2 * s.accepted + (s.proposed - s.accepted)
        # The guesses themselves (hence the module's cache) must match a cache-free computation.
        assert (ver.tokens, s.accepted, s.proposed) == reference_verify(model, prompt, n)
        accepted, proposed = accepted + s.accepted, proposed + s.proposed
    rate = accepted / proposed
    # Both branches (accept and reject) must really be exercised, else the test proves little.
    expected = {"random": (0.0, 0.2), "mirror": (0.3, 0.9), "perfect": (1.0, 1.0)}[module]
    assert expected[0] <= rate <= expected[1], rate


def test_verify_tau_tracks_acceptance():
    model = mirror_module(random_model())
    ver = greedy_generate(model, PROMPTS[1], "verify", 60)
    s = ver.stats
    assert s.tau > 1.3
    assert s.tau == pytest.approx(1 + s.acceptance_rate, abs=0.1)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 33])
def test_recycle_matches_cache_free_reference(n):
    model = random_model(seed=1)
    for prompt in PROMPTS:
        got = greedy_generate(model, prompt, "recycle", n)
        assert got.tokens == reference_recycle(model, prompt, n), prompt
        assert len(got.tokens) == n


def test_recycle_matches_reference_with_a_good_module():
    # With a mostly-right module the recycled tokens feed back into the context: a different path.
    model = mirror_module(random_model(seed=2))
    for prompt in PROMPTS:
        assert greedy_generate(model, prompt, "recycle", 30).tokens == reference_recycle(model, prompt, 30)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 40])
def test_recycle_halves_full_forwards(n):
    model = random_model()
    std = greedy_generate(model, PROMPTS[1], "standard", n).stats
    rec = greedy_generate(model, PROMPTS[1], "recycle", n).stats
    assert std.full_forwards == n
    assert rec.full_forwards == math.ceil(n / 2)
    assert rec.module_forwards == n // 2     # prefill's module pass plus one per later pair
    assert rec.new_tokens == n


@pytest.mark.parametrize("mode", ["standard", "recycle", "verify"])
def test_eos_stops_and_is_included(mode):
    model = random_model()
    # recycle's text differs from standard's, so take the stop token from the mode's own output.
    full = greedy_generate(model, PROMPTS[2], "recycle" if mode == "recycle" else "standard", 30).tokens
    eos = full[6]
    first = full.index(eos)
    got = greedy_generate(model, PROMPTS[2], mode, 30, eos_id=eos).tokens
    assert got == full[:first + 1]


def test_eos_as_the_first_token():
    model = random_model()
    first = greedy_generate(model, PROMPTS[0], "standard", 1).tokens[0]
    for mode in ("standard", "recycle", "verify"):
        g = greedy_generate(model, PROMPTS[0], mode, 20, eos_id=first)
        assert g.tokens == [first] and g.stats.full_forwards == 1


def test_bad_input_is_a_clear_error():
    model = random_model()
    with pytest.raises(DecodingError, match="valid modes"):
        greedy_generate(model, [1, 2], "beam", 4)
    with pytest.raises(DecodingError, match="context"):
        greedy_generate(model, list(range(90)), "verify", 10)
    with pytest.raises(DecodingError, match="batch size 2"):
        greedy_generate(model, torch.zeros(2, 3, dtype=torch.long), "standard", 4)
    with pytest.raises(DecodingError, match="non-empty"):
        greedy_generate(model, [], "standard", 4)
    plain = RecycleGPT(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                   ffn_hidden_size=64, max_seq_len=32, recycle_layers=0))
    with pytest.raises(DecodingError, match="recycle_layers = 0"):
        greedy_generate(plain, [1, 2], "verify", 4)
    assert len(greedy_generate(plain, [1, 2], "standard", 4).tokens) == 4


def test_longest_allowed_generation_fits_the_caches():
    # prompt + new tokens == max_seq_len: verify's guess slot and the module's rotary offset both fit.
    model = mirror_module(random_model())
    prompt = list(range(30))
    n = CFG.max_seq_len - len(prompt)
    std = greedy_generate(model, prompt, "standard", n).tokens
    assert greedy_generate(model, prompt, "verify", n).tokens == std
    assert len(greedy_generate(model, prompt, "recycle", n).tokens) == n
