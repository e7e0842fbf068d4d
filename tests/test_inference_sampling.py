"""Sampling is lossless in every lossless mode: the first tokens' distribution, enumerated exactly on a
tiny-vocabulary model, against many seeded samples (chi-square, fixed seeds) — issue 9.

The samples come from one batch of N copies of the prompt: rows draw independently, so each row is one
sample, and the test costs a handful of batched forwards.
"""
import itertools
from dataclasses import replace

import pytest
import torch

from inference.decoding import DecodingError, generate, generate_batch
from inference.draft_vocab import DraftVocab
from inference.sampling import Sampler, Sampling
from model import ModelConfig
from tests.test_inference_decoding import mirror_module, random_model

V = 6
CFG = ModelConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_size=64,
                  max_seq_len=16, recycle_layers=1)
PROMPT = [1, 4, 2]
LOOKUP_PROMPT = [3, 3, 3]      # a repeated token: copies from the prompt are proposed, and drawn about half the time
N_TOKENS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(0, CFG, std=0.3)


def exact_distribution(model, sampling: Sampling, prompt=PROMPT) -> dict[tuple, float]:
    """P(x_1 .. x_3 | prompt) under `standard` sampling, by enumeration with from-scratch forwards."""
    sampler = Sampler(sampling, "cpu")
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=N_TOKENS):
            ids = torch.tensor([prompt + list(seq)])
            probs = sampler.probs(model.logits(model.hidden(ids)[0, len(prompt) - 1:-1]))
            out[seq] = float(torch.prod(probs[torch.arange(N_TOKENS), torch.tensor(seq)]))
    return out


def chi_square_p_value(counts: dict, exact: dict, n: int) -> float:
    """Pearson's test; cells expected below 5 are pooled into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for seq, p in exact.items():
        expected = n * p
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(seq, 0), pooled_exp + expected
            continue
        stat += (counts.get(seq, 0) - expected) ** 2 / expected
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    dof = cells - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def sample_counts(model, mode, sampling, n, draft_len=1, draft_vocab=None):
    batch = generate_batch(model, [PROMPT] * n, mode, N_TOKENS, draft_len=draft_len, sampling=sampling,
                           draft_vocab=draft_vocab)
    counts = {}
    for row in batch.rows:
        counts[tuple(row.tokens)] = counts.get(tuple(row.tokens), 0) + 1
    return counts, batch


CASES = {
    "standard": ("standard", 1, None),
    "verify k=1": ("verify", 1, None),
    "verify k=2": ("verify", 2, None),
    "verify k=3, draft vocab": ("verify", 3, [0, 2, 3, 5]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, seed=11), Sampling(temperature=0.7, top_k=4,
                                                                                  top_p=0.9, seed=12)])
def test_sampled_distribution_equals_standard_sampling(model, case, sampling):
    mode, k, vocab = CASES[case]
    n = 6000
    exact = exact_distribution(model, sampling)
    counts, batch = sample_counts(model, mode, sampling, n, k, vocab and DraftVocab(torch.tensor(vocab)))
    assert sum(counts.values()) == n and all(len(seq) == N_TOKENS for seq in counts)
    p_value = chi_square_p_value(counts, exact, n)
    assert p_value > 1e-3, (case, p_value)
    if mode == "verify":
        # Both branches of the speculative rule must really run: some drafts accepted, some rejected.
        accepted = sum(s.accepted for s in batch.stats)
        proposed = sum(s.proposed for s in batch.stats)
        assert 0.02 < accepted / proposed < 0.9


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, seed=21), Sampling(temperature=0.7, top_k=4,
                                                                                  top_p=0.9, seed=22)])
@pytest.mark.parametrize("width, lookup", [(2, 0), (0, 2), (1, 2)], ids=["width", "lookup", "both"])
def test_token_trees_sample_the_standard_distribution(sampling, width, lookup):
    """verify --draft-width 2 and --lookup 2 (inference/tree_verify.py) are batch 1: one seeded call per sample.
    A module that is often right (mirror_module) makes the branch after a hit run often, and a 6-token
    vocabulary makes copies from the prompt frequent: a token after a hit drawn from the wrong position's
    distribution, or a hit kept greedily, is rejected with p < 1e-10 (checked at T = 1)."""
    model = mirror_module(random_model(0, CFG, std=0.3))
    prompt = LOOKUP_PROMPT if lookup else PROMPT
    n, hits, cycles, counts = 3000, 0, 0, {}
    for i in range(n):
        row = generate(model, prompt, "verify", N_TOKENS, draft_width=width, lookup=lookup,
                       sampling=replace(sampling, seed=i))
        counts[tuple(row.tokens)] = counts.get(tuple(row.tokens), 0) + 1
        hits, cycles = hits + row.stats.accepted, cycles + row.stats.proposed
    p_value = chi_square_p_value(counts, exact_distribution(model, sampling, prompt), n)
    assert p_value > 1e-3, p_value
    assert 0.05 < hits / cycles < 0.97, hits / cycles       # both branches ran: draws on and off the candidates


def test_the_chi_square_test_can_fail(model):
    # The same counts against a slightly different distribution (temperature 1.0 vs 0.9) must be rejected.
    counts, _ = sample_counts(model, "standard", Sampling(temperature=1.0, seed=3), 6000)
    assert chi_square_p_value(counts, exact_distribution(model, Sampling(temperature=0.9)), 6000) < 1e-3


def test_same_seed_same_text_other_seed_other_text(model):
    a = generate(model, PROMPT, "verify", 10, draft_len=2, sampling=Sampling(temperature=1.0, seed=5)).tokens
    b = generate(model, PROMPT, "verify", 10, draft_len=2, sampling=Sampling(temperature=1.0, seed=5)).tokens
    others = {tuple(generate(model, PROMPT, "verify", 10, draft_len=2,
                             sampling=Sampling(temperature=1.0, seed=s)).tokens) for s in range(6, 10)}
    assert a == b and len(others | {tuple(a)}) > 1


def test_recycle_samples_too(model):
    counts, _ = sample_counts(model, "recycle", Sampling(temperature=1.0, seed=1), 400)
    assert len(counts) > 20         # not one fixed greedy text


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    probs = Sampler(Sampling(temperature=1.0, top_k=2), "cpu").probs(logits)
    assert (probs[0, 2:] == 0).all() and probs[0, :2].sum() == pytest.approx(1.0)
    full = logits.softmax(-1)[0]
    # top-p 0.8: 0.64 (first token) is not enough, 0.64 + 0.24 is: keep two.
    assert full[0] < 0.8 < full[0] + full[1]
    probs = Sampler(Sampling(temperature=1.0, top_p=0.8), "cpu").probs(logits)
    assert (probs[0, 2:] == 0).all() and probs[0, 0] / probs[0, 1] == pytest.approx(float(full[0] / full[1]))


def test_bad_sampling_values_are_clear_errors(model):
    for bad, match in [(Sampling(temperature=-1), "temperature"), (Sampling(temperature=1, top_p=0), "top-p"),
                       (Sampling(temperature=1, top_k=-2), "top-k")]:
        with pytest.raises(DecodingError, match=match):
            generate(model, PROMPT, "verify", 4, sampling=bad)
