"""Multi-token drafts, batches and the draft vocabulary against cache-free references (issue 9).

The references recompute every state from scratch (`model.hidden`, `model.draft_step` without a cache) over
the verified text, so a position, rollback or cache-length bug in inference/drafting.py or a ragged-cache
bug in model/kv_cache.py shows up as a token or count mismatch.
"""
import pytest
import torch

from inference.decoding import DecodingError, generate, generate_batch, greedy_generate
from tests.test_inference_decoding import PROMPTS, mirror_module, perfect_module, random_model, reference_standard
from inference.draft_vocab import DraftVocab

MODULES = {"random": lambda m: m, "mirror": mirror_module, "perfect": perfect_module}


pytestmark = pytest.mark.usefixtures("one_thread")


def argmax(model, states, vocab=None):
    if vocab is None:
        return int(model.logits(states).argmax())
    return int(vocab.token_ids[(model.lm_head.weight[vocab.token_ids] @ states).argmax()])


def reference_drafts(model, prompt, n, k, eos=None, vocab=None):
    """Greedy verify with k drafts, from scratch. Returns (tokens, accepted, proposed).

    The drafts are the module unrolled over the whole text as in training (model/recycle.py): depth 1 from
    the full model's h over the verified text x_0 .. x_n (positions 0 .. n-1, next tokens x_1 .. x_n), depth
    j from depth j-1 with next tokens x_j .. x_{n+j-1}, where the tokens past x_n are this cycle's drafts;
    draft j is the depth-j state at position n-1."""
    seq, accepted, proposed = list(prompt), 0, 0
    new = lambda: len(seq) - len(prompt)                                    # noqa: E731
    with torch.no_grad():
        seq.append(argmax(model, model.hidden(torch.tensor([seq]))[0, -1]))
        while new() < n and seq[-1] != eos:
            kk = min(k, n - new())
            last = len(seq) - 1
            state = model.hidden(torch.tensor([seq[:last]]))
            drafts = []
            for j in range(1, kk + 1):
                text = seq + drafts
                state = model.draft_step(state, torch.tensor([text[j:last + j]]))
                drafts.append(argmax(model, state[0, -1], vocab))
            target = model.logits(model.hidden(torch.tensor([seq + drafts]))[0, last:]).argmax(-1).tolist()
            a = 0
            while a < kk and drafts[a] == target[a]:
                a += 1
            proposed, accepted = proposed + kk, accepted + a
            for token in drafts[:a] + [target[a]]:
                seq.append(token)
                if new() == n or token == eos:
                    break
    return seq[len(prompt):], accepted, proposed


@pytest.mark.parametrize("module", sorted(MODULES))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_drafts_equal_standard_and_the_cache_free_reference(module, k):
    model = MODULES[module](random_model())
    accepted = proposed = 0
    for prompt in PROMPTS[1:]:
        n = 30
        got = greedy_generate(model, prompt, "verify", n, draft_len=k)
        assert got.tokens == reference_standard(model, prompt, n), (module, k, prompt)
        s = got.stats
        assert (got.tokens, s.accepted, s.proposed) == reference_drafts(model, prompt, n, k)
        cycles = s.full_forwards - 1      # each: k - 1 draft runs and one refresh per depth (none after the last)
        assert s.proposed <= cycles * k and s.module_forwards <= k + cycles * (2 * k - 1)
        accepted, proposed = accepted + s.accepted, proposed + s.proposed
    rate = accepted / proposed
    expected = {"random": (0.0, 0.2), "mirror": (0.2, 0.9), "perfect": (1.0, 1.0)}[module]
    assert expected[0] <= rate <= expected[1], rate


def test_perfect_drafts_give_k_plus_one_tokens_per_forward():
    model = perfect_module(random_model())
    for k in (1, 2, 4):
        s = greedy_generate(model, PROMPTS[1], "verify", 61, draft_len=k).stats
        # prefill gives 1 token, each cycle k + 1
        assert s.full_forwards == 1 + 60 // (k + 1) + (60 % (k + 1) > 0)
        assert s.accepted == s.proposed


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_drafts_respect_max_new_tokens(n):
    model = perfect_module(random_model())
    for k in (1, 3, 6):
        got = greedy_generate(model, PROMPTS[2], "verify", n, draft_len=k)
        assert got.tokens == reference_standard(model, PROMPTS[2], n)
        assert (got.tokens, got.stats.accepted, got.stats.proposed) == reference_drafts(model, PROMPTS[2], n, k)


@pytest.mark.parametrize("module", ["mirror", "perfect"])
def test_eos_inside_an_accepted_run_stops_there(module):
    model = MODULES[module](random_model())
    std = reference_standard(model, PROMPTS[1], 40)
    for k in (2, 4):
        for eos in dict.fromkeys(std[3:12]):
            got = greedy_generate(model, PROMPTS[1], "verify", 40, eos_id=eos, draft_len=k)
            assert got.tokens == std[:std.index(eos) + 1]
            assert (got.tokens, got.stats.accepted, got.stats.proposed) == \
                reference_drafts(model, PROMPTS[1], 40, k, eos=eos)


def test_longest_generation_with_long_drafts_fits_the_context():
    model = perfect_module(random_model())
    prompt = list(range(30))
    n = model.cfg.max_seq_len - len(prompt)
    assert greedy_generate(model, prompt, "verify", n, draft_len=6).tokens == reference_standard(model, prompt, n)


# ------------------------------------------------------------------------------------------------ batches
BATCH = [[5], [17, 3, 99, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], list(range(200, 223))]


@pytest.mark.parametrize("mode,k", [("standard", 1), ("recycle", 1), ("verify", 1), ("verify", 3)])
def test_each_batch_row_equals_its_batch_of_one(mode, k):
    model = mirror_module(random_model(seed=3))
    # EOS from one row's text, so that row stops early while the others go on.
    eos = greedy_generate(model, BATCH[2], mode, 30, draft_len=k).tokens[9]
    batch = generate_batch(model, BATCH, mode, 30, eos_id=eos, draft_len=k)
    for prompt, row in zip(BATCH, batch.rows):
        single = greedy_generate(model, prompt, mode, 30, eos_id=eos, draft_len=k)
        assert row.tokens == single.tokens, (mode, prompt)
        # (near the end of a row's budget the batch drafts fewer tokens for every row, so the proposal
        # counts may differ from batch 1; the tokens may not)
    assert any(len(r.tokens) < 30 for r in batch.rows) and any(len(r.tokens) == 30 for r in batch.rows)
    assert batch.new_tokens == sum(len(r.tokens) for r in batch.rows)


def test_ragged_cache_matches_separate_caches():
    # Rows at different lengths, written by one batched forward, give the same states as batch-1 caches.
    model = random_model()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache, _ = model.new_caches(3, 16)
        model.base_step(ids[:, :8], cache)
        cache.rollback([3, 0, 5])                  # rows now hold 5, 8 and 3 positions
        h = model.base_step(ids[:, 8:11], cache)   # row b continues at its own position with these 3 tokens
        for b, kept in enumerate([5, 8, 3]):
            ref = model.hidden(torch.cat([ids[b:b + 1, :kept], ids[b:b + 1, 8:11]], dim=1))[:, kept:]
            torch.testing.assert_close(h[b:b + 1], ref, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [8, 11, 6]


# -------------------------------------------------------------------------------------- draft vocabulary
def test_draft_vocabulary_stays_lossless_and_drafts_only_its_tokens():
    model = mirror_module(random_model())
    counts = torch.zeros(256)
    std = reference_standard(model, PROMPTS[1], 30)
    counts[torch.tensor(std)] += 1                   # the tokens the text needs, plus filler ids
    counts[:64] += 0.5
    vocab = DraftVocab.from_counts(counts, 48)
    for k in (1, 3):
        got = generate(model, PROMPTS[1], "verify", 30, draft_len=k, draft_vocab=vocab)
        assert got.tokens == std
        assert (got.tokens, got.stats.accepted, got.stats.proposed) == \
            reference_drafts(model, PROMPTS[1], 30, k, vocab=vocab)
    # A vocabulary without the text's tokens can never be right, and still changes nothing in the output.
    useless = DraftVocab(torch.tensor(sorted(set(range(256)) - set(std)))[:16])
    got = generate(model, PROMPTS[1], "verify", 30, draft_len=2, draft_vocab=useless)
    assert got.tokens == std and got.stats.accepted == 0


def test_draft_vocabulary_file_round_trip(tmp_path):
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    vocab = DraftVocab.from_counts(counts, 4)
    assert vocab.token_ids.tolist() == [2, 3, 5, 0]
    vocab.save(tmp_path / "dv.safetensors")
    assert DraftVocab.load(tmp_path / "dv.safetensors").token_ids.tolist() == [2, 3, 5, 0]
    with pytest.raises(DecodingError, match="draft vocabulary"):
        generate(random_model(), [1, 2], "verify", 4, draft_vocab=DraftVocab(torch.tensor([3, 999])))


def test_bad_draft_len_is_a_clear_error():
    with pytest.raises(DecodingError, match="draft_len=0"):
        greedy_generate(random_model(), [1, 2], "verify", 4, draft_len=0)


# ------------------------------------------------------------------------------------- choosing k (auto)
def test_expected_tokens_and_the_best_draft_len():
    from inference.draft_policy import best_draft_len, expected_tokens, predicted_speedup

    assert expected_tokens([0.5, 0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    flat = {m: 1.0 for m in range(1, 6)}
    assert best_draft_len([0.9] * 4, flat, 0.01) == 4          # free verification, good drafts: draft many
    assert best_draft_len([0.05] * 4, flat, 0.3) == 1          # bad drafts: one
    steep = {m: 1.0 + 0.5 * (m - 1) for m in range(1, 6)}       # each verified token costs half a step
    assert best_draft_len([0.9] * 4, steep, 0.05) < 4
    assert predicted_speedup([1.0], 1, {1: 1.0, 2: 1.0}, 0.0) == 2.0
    # the k - 1 deeper-depth refresh passes count: with costly ones, good drafts no longer pay at every depth
    assert predicted_speedup([1.0, 1.0], 2, {3: 1.0}, 0.0, f_refresh=0.5) == pytest.approx(3 / 1.5)
    assert best_draft_len([0.6] * 4, flat, 0.05, f_refresh=0.4) == 1


@pytest.mark.parametrize("module", ["random", "perfect"])
def test_auto_draft_len_is_lossless_and_follows_acceptance(module):
    from inference.draft_policy import AutoDraftLen

    model = MODULES[module](random_model())
    costs = {m: 1.0 + 0.02 * m for m in range(1, 6)}
    policy = AutoDraftLen(costs, 0.1)
    got = generate(model, PROMPTS[1], "verify", 40, draft_len=policy)
    assert got.tokens == reference_standard(model, PROMPTS[1], 40)
    assert got.stats.draft_len == (4 if module == "perfect" else 1)
    # and the measured variant runs end to end
    assert generate(model, PROMPTS[1], "verify", 12, draft_len="auto").tokens == reference_standard(model, PROMPTS[1], 12)


def test_draft_vocab_tool_counts_tokenized_shards(tmp_path, capsys):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from inference import draft_vocab

    prefix = str(tmp_path / "shard")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = [[7, 7, 7, 3, 9], [3, 7, 1], [9, 7, 3, 3]]       # counts: 7 -> 5, 3 -> 4, 9 -> 2, 1 -> 1
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    out = tmp_path / "draft_vocab.safetensors"
    assert draft_vocab.main(["--data", prefix, "--size", "3", "--output", str(out)]) == 0
    assert DraftVocab.load(out).token_ids.tolist() == [7, 3, 9]
    assert "covering 91.7%" in capsys.readouterr().out               # 11 of 12 tokens
    assert draft_vocab.main(["--data", str(tmp_path / "none"), "--output", str(out)]) == 2
