"""`verify --lookup L` (inference/lookup.py, inference/tree_verify.py): drafts copied from earlier in the text
join the module's candidates in one token tree. What it proposes; lossless against `standard` with and without
the module, deep accepted runs included; the flags refuse what it does not do. Sampling:
tests/test_inference_sampling.py."""
import pytest
import torch

from inference import benchmark, generate as generate_cli
from inference.cli import UsageError, parse_lookups
from inference.decoding import DecodingError, generate_batch
from inference.lookup import PromptLookup
from inference.rows import Rows
from inference.sampling import GREEDY, Sampler
from inference.tree_verify import accepted_path, decode_verify_tree, draft_tree
from tests.helpers import tiny_benchmark
from tests.test_inference_decoding import PROMPTS, mirror_module, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lookup_copies_what_followed_the_longest_most_recent_match():
    lookup = PromptLookup(3)
    assert lookup.propose([5, 6, 7]) == []                                  # no earlier occurrence of any suffix
    assert lookup.propose([5, 6, 7, 1, 6, 7, 2, 9, 6, 7]) == [2, 9, 6]      # "6 7": the most recent one wins
    assert lookup.propose([5, 6, 7, 1, 6, 7, 2, 9, 6, 7, 1, 5, 6, 7]) == [1, 6, 7]   # "5 6 7" beats the later "6 7"
    assert lookup.propose([5, 6, 7, 1, 6, 7, 2, 9, 6, 7, 1, 5, 6, 7, 8], limit=2) == []
    loop = PromptLookup(5)
    assert loop.propose([4, 1, 2, 1, 2]) == [1, 2]                          # runs into the text's own end
    assert PromptLookup(4, ngram_max=2, ngram_min=2).propose([3, 8, 9, 8]) == []      # 1-gram matches off
    with pytest.raises(ValueError, match="got shorter"):
        loop.propose([4, 1])


def test_the_tree_hangs_the_copy_below_the_candidate_it_starts_with():
    assert draft_tree(9, [7, 8], [8, 3, 4]) == ([9, 7, 8, 3, 4], [-1, 0, 0, 2, 3])
    assert draft_tree(9, [7, 8], [5, 3]) == ([9, 7, 8, 5, 3], [-1, 0, 0, 0, 3])
    assert draft_tree(9, [], [5, 3]) == ([9, 5, 3], [-1, 0, 1])
    assert draft_tree(9, [7], [9, 9]) == ([9, 7, 9, 9], [-1, 0, 0, 2])        # the root's token is no candidate
    full_model = {0: 8, 2: 3, 3: 9}                                         # its token after each node
    assert accepted_path([-1, 7, 8, 3, 4], [-1, 0, 0, 2, 3], full_model.get) == ([2, 3], [8, 3, 9])
    assert accepted_path([-1, 7], [-1, 0], {0: 2}.get) == ([], [2])


def looping_model(seed: int):
    """A model with its attention output zeroed: the next token depends on the last one only, so greedy text
    falls into a loop within a few tokens, which is what the lookup copies. The module mirrors the layers."""
    model = random_model(seed=seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attention.linear_proj.weight.zero_()
    return mirror_module(model)


@pytest.mark.parametrize("seed", [3, 4])
def test_lookup_is_lossless_and_copies_loops(seed):
    """Greedy tokens equal `standard`'s for every width (0: the module idle), lookup length, prompt and budget,
    EOS inside the run too. On looping text the copy is accepted many tokens deep: the kept branch was moved
    into place (KVCache.move_slot) and decoding went on from it."""
    model = looping_model(seed)
    copied = {}
    for prompt in PROMPTS:
        for new_tokens in (1, 2, 7, 40):
            std = generate_batch(model, [prompt], "standard", new_tokens).rows[0].tokens
            for width, lookup in ((0, 1), (0, 6), (1, 3), (3, 6)):
                row = generate_batch(model, [prompt], "verify", new_tokens, draft_width=width, lookup=lookup).rows[0]
                assert row.tokens == std, (prompt, new_tokens, width, lookup)
                assert row.stats.lookup == lookup and row.stats.accepted <= row.stats.proposed
                if new_tokens == 40 and lookup == 6:
                    copied[width] = copied.get(width, 0) + row.stats.accepted
                    # The module catches up after the prefill and after every cycle but the last; idle at width 0.
                    assert row.stats.module_forwards == (0 if width == 0 else row.stats.full_forwards - 1)
        eos = std[len(std) // 2]
        want = generate_batch(model, [prompt], "standard", 40, eos_id=eos).rows[0].tokens
        assert generate_batch(model, [prompt], "verify", 40, eos_id=eos, draft_width=2, lookup=5).rows[0].tokens == want
    assert min(copied.values()) >= 60, copied          # of 4 x 40 tokens: the loops start within ~20 tokens


@pytest.mark.parametrize("width, lookup", [(0, 6), (3, 6)])
def test_after_deep_copies_the_caches_hold_the_verified_text(width, lookup):
    """The looping model's output ignores its caches, so equal tokens alone cannot show that the kept branch
    was moved into place: compare the caches themselves with cache-free runs over the verified text. The
    base cache holds x_0 .. x_{N-2} (the last token not yet seen); the module's (fed h, which this module
    does use) holds the positions it caught up over, from the true h."""
    model = looping_model(3)
    with torch.no_grad():
        model.recycle.linear_in.weight.add_(0.05 * torch.randn_like(model.recycle.linear_in.weight))
    prompt = PROMPTS[3]
    rows = Rows([prompt], "verify", 40, None, Sampler(GREEDY, "cpu"), 1, "cpu")
    caches = model.new_caches(1, 90)
    with torch.no_grad():
        decode_verify_tree(model, rows, caches, width, lookup, None, 0.0)
        assert rows.stats[0].accepted >= 20                      # deep copies were kept
        text = prompt + rows.tokens[0]
        fresh_base, fresh_module = model.new_caches(1, 90)
        h = model.base_step(torch.tensor([text[:-1]]), fresh_base)
        base, module = caches
        assert base.length == len(text) - 1
        for got, want in zip(base.keys + base.values, fresh_base.keys + fresh_base.values):
            torch.testing.assert_close(got[:, :, :base.length], want[:, :, :base.length], atol=1e-5, rtol=1e-5)
        if width:
            m = module.length
            assert m >= len(text) - 2 - (lookup + 1)                # all but the last cycle's positions
            model.module_step(h[:, :m], torch.tensor([text[1:m + 1]]), fresh_module)
            for got, want in zip(module.keys + module.values, fresh_module.keys + fresh_module.values):
                torch.testing.assert_close(got[:, :, :m], want[:, :, :m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "recycle"}, "--lookup 4: it applies to mode verify only"),
    ({"draft_len": 2}, "--lookup 4: it needs --draft-len 1"),
    ({"prompts": [PROMPTS[1], PROMPTS[2]]}, "--lookup 4: it decodes one prompt at a time"),
    ({"lookup": -1}, "lookup=-1 must be an int >= 0"),
    ({"lookup": 0, "draft_width": 0}, "0 only with --lookup"),
])
def test_what_a_lookup_does_not_do_is_refused(kwargs, message):
    model = mirror_module(random_model(seed=3))
    call = {"prompts": [PROMPTS[1]], "mode": "verify", "draft_len": 1, "draft_width": 1, "lookup": 4} | kwargs
    with pytest.raises(DecodingError, match=message):
        generate_batch(model, call["prompts"], call["mode"], 8, draft_len=call["draft_len"],
                       draft_width=call["draft_width"], lookup=call["lookup"])


def test_lookup_flags(tmp_path, capsys):
    assert parse_lookups("0,8,8,4") == [0, 8, 4]
    for bad in ("-1", "x", ""):
        with pytest.raises(UsageError, match="--lookup"):
            parse_lookups(bad)
    with pytest.raises(UsageError, match="--lookup 4: it decodes one prompt at a time"):
        generate_cli.main(["--preset", "tiny", "--random-init", "--batch-file", str(_two_prompts(tmp_path)),
                           "--mode", "verify", "--lookup", "4"])
    with pytest.raises(UsageError, match="give one length here"):
        generate_cli.main(["--preset", "tiny", "--random-init", "--prompt", "x", "--mode", "verify", "--lookup", "2,4"])
    out = tmp_path / "bench.json"
    with pytest.raises(UsageError, match="--draft-width 0 \\(the module idle\\) needs --lookup"):
        benchmark.main(["--preset", "tiny", "--random-init", "--draft-width", "0", "--output", str(out)])
    with pytest.raises(UsageError, match="token trees go with --draft-len 1"):
        benchmark.main(["--preset", "tiny", "--random-init", "--draft-len", "2", "--lookup", "4", "--output", str(out)])


def _two_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one\ntwo\n")
    return path


def test_benchmark_reports_each_lookup(tmp_path):
    modes = tiny_benchmark(tmp_path / "bench.json", "--modes", "standard,verify", "--draft-width", "0,1,2",
                           "--lookup", "0,3", repeats=2)["modes"]
    assert set(modes) == {"standard", "verify", "verify_l3", "verify_w0_l3", "verify_w2", "verify_w2_l3"}
    assert [(modes[n]["draft_width"], modes[n]["lookup"]) for n in ("verify_w0_l3", "verify_w2_l3")] == [(0, 3), (2, 3)]
    assert all(modes[n]["identical_to_standard"] for n in modes if n != "standard")
    assert "predicted_speedup" in modes["verify_w2"] and "predicted_speedup" not in modes["verify_l3"]
    for m in modes.values():            # both repeats' tokens over both their seconds: between the slower and faster
        assert min(m["tokens_per_s_runs"]) <= m["tokens_per_s_total"] <= max(m["tokens_per_s_runs"])
