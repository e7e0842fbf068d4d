"""`--weight-layout` (inference/weight_layout.py): column-major Linear weights decode the same text as row-major
ones, and loading through the shared inference flags really stores them that way."""
import copy

import pytest
import torch

from inference import weight_layout
from inference.decoding import generate_batch
from model.draft_vocab import DraftVocab
from tests.test_inference_decoding import PROMPTS, mirror_module, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def both_layouts():
    row = mirror_module(random_model(seed=3))            # a module that is often right: multi-token steps happen
    column = weight_layout.apply(copy.deepcopy(row), "column")
    return row, column


def test_auto_is_column_for_fp32_on_cpu_only():
    assert weight_layout.resolve("auto", "cpu", torch.float32) == "column"
    assert weight_layout.resolve("auto", "cpu", torch.bfloat16) == "row"       # measured slower (docs/inference.md)
    assert weight_layout.resolve("auto", "cuda", torch.float32) == "row"
    assert weight_layout.resolve("row", "cpu", torch.float32) == "row"
    assert weight_layout.resolve("column", "cuda", torch.bfloat16) == "column"
    with pytest.raises(ValueError, match="valid: auto, row, column"):
        weight_layout.resolve("diagonal", "cpu", torch.float32)


def test_column_layout_stores_every_linear_transposed_with_equal_values():
    row, column = both_layouts()
    assert weight_layout.layout_of(row) == "row" and weight_layout.layout_of(column) == "column"
    named = dict(column.named_parameters())
    linears = {n for n, p in named.items() if any(p is w for w in weight_layout.linear_weights(column))}
    # decoder layers, the module's layers and W_proj, the LM head; never the embedding (read by row)
    assert "lm_head.weight" in linears and "recycle.linear_in.weight" in linears and "embedding.weight" not in linears
    assert any(n.startswith("layers.") for n in linears) and any(n.startswith("recycle.layers.") for n in linears)
    for name, p in row.named_parameters():
        assert torch.equal(p, named[name]), name
        if name in linears:
            assert named[name].stride() == (1, p.shape[0]), name


def test_column_layout_decodes_the_same_greedy_text():
    row, column = both_layouts()
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[3]])
        torch.testing.assert_close(column.logits(column.hidden(ids)), row.logits(row.hidden(ids)), atol=1e-5, rtol=1e-5)
    counts = torch.bincount(torch.tensor([t for p in PROMPTS for t in p]), minlength=256).float() + torch.rand(256)
    vocab = DraftVocab.from_counts(counts, 96)
    accepted = 0
    for mode, k, dv in [("standard", 1, None), ("recycle", 1, None), ("verify", 1, None), ("verify", 3, None),
                        ("verify", 2, vocab)]:
        a = generate_batch(row, PROMPTS, mode, 24, draft_len=k, draft_vocab=dv)
        b = generate_batch(column, PROMPTS, mode, 24, draft_len=k, draft_vocab=copy.deepcopy(dv))
        assert [r.tokens for r in a.rows] == [r.tokens for r in b.rows], (mode, k, dv is not None)
        accepted += sum(s.accepted for s in b.stats)
    assert accepted > 10                          # drafts were accepted: multi-token verify steps ran


def test_draft_vocabulary_rows_follow_the_heads_layout():
    row, column = both_layouts()
    vocab = DraftVocab(torch.tensor([7, 3, 200, 41]))
    states = torch.randn(2, row.cfg.hidden_size)
    torch.testing.assert_close(vocab.logits(column, states), vocab.logits(row, states), atol=1e-5, rtol=1e-5)
    vocab.logits(column, states)
    (copied,) = vocab._weights.values()
    assert weight_layout.is_column_major(copied) and copied.shape == (4, row.cfg.hidden_size)


@pytest.mark.parametrize("flags, expected", [([], "column"), (["--weight-layout", "row"], "row"),
                                             (["--dtype", "bf16"], "row"), (["--dtype", "bf16", "--weight-layout",
                                                                             "column"], "column")])
def test_shared_inference_flags_apply_the_layout_at_load(flags, expected):
    """What inference.generate / benchmark / evaluate load: auto means column for fp32 on this CPU."""
    import argparse

    from inference.cli import add_model_args, check_model_args, model_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--preset", "tiny", "--random-init", "--device", "cpu", *flags])
    check_model_args(args)
    model = model_from_args(args, cache_len=32)[0]
    assert weight_layout.layout_of(model) == expected
    head = model.lm_head.weight
    assert head.stride() == ((1, head.shape[0]) if expected == "column" else (head.shape[1], 1))
