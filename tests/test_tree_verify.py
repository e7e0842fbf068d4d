"""`verify --draft-width W` (inference/tree_verify.py): the module's top W tokens checked side by side by one
tree-attention forward (`GPT.tree_step`). Lossless against `standard`, more drafts accepted than W = 1, and
the flags refuse what it does not do (batches, deeper drafts, other modes) with one line. Sampling:
tests/test_inference_sampling.py."""
import pytest
import torch

from inference import benchmark
from inference.cli import UsageError, check_draft_width, parse_draft_widths
from inference.decoding import DecodingError, generate, generate_batch
from model.draft_vocab import DraftVocab
from tests.helpers import tiny_benchmark
from tests.test_inference_decoding import PROMPTS, mirror_module, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def cache_free_states(model, ids: list[int]) -> torch.Tensor:
    cache, _ = model.new_caches(1, 64)
    return model.base_step(torch.tensor([ids]), cache)[0]


@pytest.mark.parametrize("parents", [[-1, 0, 0, 0], [-1, 0, 1], [-1, 0, 0, 1, 2]], ids=["siblings", "chain", "tree"])
def test_tree_step_gives_each_branch_the_states_of_its_own_sequence(parents):
    """Token j of the tree sees the cache and its ancestors only: its state is the state of the plain sequence
    prefix + ancestors + itself, at the position after its parent."""
    model = random_model(seed=3).eval()
    prefix, tokens = PROMPTS[2], [7, 19, 33, 5, 61][:len(parents)]
    with torch.no_grad():
        cache, _ = model.new_caches(1, 64)
        model.base_step(torch.tensor([prefix]), cache)
        h = model.tree_step(torch.tensor([tokens]), cache, parents)[0]
        assert cache.length == len(prefix) + len(parents)
        for j in range(len(parents)):
            path, node = [], j
            while node >= 0:
                path.insert(0, tokens[node])
                node = parents[node]
            want = cache_free_states(model, prefix + path)[-1]
            torch.testing.assert_close(h[j], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="each must be -1 or an earlier token's index"):
        model.tree_step(torch.tensor([[1, 2]]), cache, [-1, 1])


def test_move_slot_copies_a_position_in_every_layer():
    model = random_model(seed=3)
    cache, _ = model.new_caches(1, 16)
    with torch.no_grad():
        model.base_step(torch.tensor([[3, 4, 5, 6]]), cache)
    before = [k[:, :, 3].clone() for k in cache.keys]
    cache.move_slot(3, 1)
    for layer, keys in enumerate(cache.keys):
        assert torch.equal(keys[:, :, 1], before[layer]) and torch.equal(cache.values[layer][:, :, 1],
                                                                         cache.values[layer][:, :, 3])


@pytest.mark.parametrize("with_vocab", [False, True], ids=["whole-vocab", "draft-vocab"])
def test_wider_drafts_are_lossless_and_accept_more(with_vocab):
    """Greedy tokens equal `standard`'s for every width, prompt and budget (EOS inside the run too); a wider
    draft accepts at least as often, and more often overall: second-best candidates were hit, so the kept
    branch was moved into place (KVCache.move_slot) and decoding went on from it."""
    model = mirror_module(random_model(seed=3))          # a module that is often right, and often second-best
    vocab = None
    if with_vocab:
        counts = torch.bincount(torch.tensor([t for p in PROMPTS for t in p]), minlength=256).float() + torch.rand(256)
        vocab = DraftVocab.from_counts(counts, 128)
    accepted = {}
    for prompt in PROMPTS:
        for new_tokens in (1, 2, 7, 40):
            std = generate_batch(model, [prompt], "standard", new_tokens).rows[0].tokens
            for width in (1, 2, 4, 8):
                row = generate_batch(model, [prompt], "verify", new_tokens, draft_width=width,
                                     draft_vocab=vocab).rows[0]
                assert row.tokens == std, (prompt, new_tokens, width)
                assert row.stats.draft_width == width and row.stats.tau >= 1
                accepted[width] = accepted.get(width, 0) + row.stats.accepted
        assert generate(model, prompt, "verify", 40, draft_width=3).tokens == std        # the one-prompt API
        eos = std[len(std) // 2]                            # stop at a token inside the run
        want = generate_batch(model, [prompt], "standard", 40, eos_id=eos).rows[0].tokens
        assert generate_batch(model, [prompt], "verify", 40, eos_id=eos, draft_width=4,
                              draft_vocab=vocab).rows[0].tokens == want
    assert accepted[1] <= accepted[2] <= accepted[4] <= accepted[8] and accepted[8] > accepted[1] + 10, accepted


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "recycle"}, "applies to mode verify only"),
    ({"draft_len": 2}, "needs --draft-len 1"),
    ({"prompts": [PROMPTS[1], PROMPTS[2]]}, "one prompt at a time"),
    ({"draft_width": 0}, "must be an int >= 1"),
])
def test_what_a_width_does_not_do_is_refused(kwargs, message):
    model = mirror_module(random_model(seed=3))
    call = {"prompts": [PROMPTS[1]], "mode": "verify", "draft_len": 1, "draft_width": 3} | kwargs
    with pytest.raises(DecodingError, match=message):
        generate_batch(model, call["prompts"], call["mode"], 8, draft_len=call["draft_len"],
                       draft_width=call["draft_width"])


def test_width_flags_are_checked_before_loading():
    assert parse_draft_widths("1,4,4,8") == [1, 4, 8]
    for bad in ("-1", "x", "2,-1"):
        with pytest.raises(UsageError, match="--draft-width"):
            parse_draft_widths(bad)
    with pytest.raises(UsageError, match="--draft-width 4: it decodes one prompt at a time"):
        check_draft_width(4, "verify", 1, 2)
    check_draft_width(4, "verify", 1, 1)


def test_benchmark_reports_each_width(tmp_path):
    out = tmp_path / "bench.json"
    modes = tiny_benchmark(out, "--modes", "standard,verify", "--draft-len", "1,2", "--draft-width", "1,3")["modes"]
    assert set(modes) == {"standard", "verify_k1", "verify_k1_w3", "verify_k2"}
    assert [modes[n]["draft_width"] for n in ("verify_k1", "verify_k1_w3", "verify_k2")] == [1, 3, 1]
    assert all(modes[n]["identical_to_standard"] for n in modes if n != "standard")
    assert "predicted_speedup" in modes["verify_k1_w3"]
    with pytest.raises(UsageError, match="token trees go with --draft-len 1"):
        benchmark.main(["--preset", "tiny", "--random-init", "--draft-len", "2", "--draft-width", "3",
                        "--output", str(out)])


def test_evaluate_reports_the_acceptance_of_each_width():
    """inference.evaluate's `acceptance_by_width`: how often one of the module's top W tokens is the full
    model's own next argmax, teacher-forced; W = 1 is `acceptance_rate` itself, and wider can only hit more."""
    from inference.evaluate import WIDTHS, teacher_forced

    model = mirror_module(random_model(seed=3)).eval()
    pieces = [PROMPTS[3], PROMPTS[2] * 3]
    result = teacher_forced(model, pieces, "cpu")
    by_width = result["acceptance_by_width"]
    assert list(by_width) == [str(w) for w in WIDTHS]
    assert by_width["1"] == pytest.approx(result["acceptance_rate"])
    assert all(a <= b for a, b in zip(list(by_width.values()), list(by_width.values())[1:]))
    assert by_width["8"] > by_width["1"]


def test_a_wide_cycle_costs_one_full_step_over_one_plus_w_tokens():
    """The benchmark's predicted speedup for width W: one full step of 1 + W tokens and the module's one step."""
    from inference.draft_policy import cycle_cost

    ratio = {2: 1.1, 3: 1.2, 4: 1.3, 5: 1.5}
    assert cycle_cost(1, ratio, 0.1) == pytest.approx(1.2)                  # k = 1: c(2) + f
    assert cycle_cost(1, ratio, 0.1, 0.05, width=3) == pytest.approx(1.4)   # c(4) + f
    assert cycle_cost(2, ratio, 0.1, 0.05) == pytest.approx(1.45)           # c(3) + 2 f + f_refresh
