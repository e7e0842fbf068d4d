"""`--weight-layout` (inference/weight_layout.py): column-major and oneDNN-packed Linear weights decode the same text
as row-major ones, and loading through the shared inference flags really stores them that way."""
import copy

import pytest
import torch

from inference import weight_layout
from inference.decoding import generate_batch
from model import strides
from model.draft_vocab import DraftVocab
from tests.test_inference_decoding import PROMPTS, mirror_module, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def both_layouts(layout="column"):
    row = mirror_module(random_model(seed=3))            # a module that is often right: multi-token steps happen
    other = weight_layout.apply(copy.deepcopy(row), layout)
    return row, other


def test_auto_is_packed_for_fp32_on_one_cpu_rank_only():
    assert weight_layout.resolve("auto", "cpu", torch.float32) == "packed"
    assert weight_layout.resolve("auto", "cpu", torch.float32, tp=2) == "column"   # megatron's linears: no packed path
    assert weight_layout.resolve("auto", "cpu", torch.bfloat16) == "row"       # measured slower (docs/inference.md)
    assert weight_layout.resolve("auto", "cuda", torch.float32) == "row"
    assert weight_layout.resolve("row", "cpu", torch.float32) == "row"
    assert weight_layout.resolve("column", "cuda", torch.bfloat16) == "column"
    assert weight_layout.resolve("packed", "cpu", torch.bfloat16) == "packed"
    for device, tp in [("cuda", 1), ("cpu", 2)]:
        with pytest.raises(ValueError, match="packed needs a CPU with oneDNN .* and --tp 1"):
            weight_layout.resolve("packed", device, torch.float32, tp)
    with pytest.raises(ValueError, match="valid: auto, row, column, packed"):
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


@pytest.mark.parametrize("kernel", sorted(strides.FEW_ROW_KERNELS))
def test_packed_layout_multiplies_by_the_twin_and_few_rows_by_the_kernel_measured_faster(monkeypatch, kernel):
    measured = []
    monkeypatch.setattr(strides.FewRowKernel, "measure",
                        lambda self, rows: measured.append((len(self.linears), rows)) or kernel)
    row, packed = both_layouts("packed")
    assert weight_layout.layout_of(packed) == "packed"
    for module in weight_layout.linears(packed):          # every Linear, the LM head and the module's W_proj too
        assert module.packed_weight.is_mkldnn and weight_layout.is_column_major(module.weight)
    for name, p in row.named_parameters():               # equal values (tied, saved and trained weights read them)
        assert torch.equal(p, dict(packed.named_parameters())[name]), name
    ids, one, two = torch.tensor([PROMPTS[3]]), torch.tensor([PROMPTS[3][:1]]), torch.tensor([PROMPTS[3][:2]])
    n = len(weight_layout.linears(packed))
    with torch.no_grad():
        want, want_one, want_two = row.hidden(ids), row.hidden(one), row.hidden(two)
        for module in weight_layout.linears(packed):      # blank the weights the model keeps; not the twins
            if module is not packed.lm_head:              # (the head's weight is the embedding's, tied)
                module.weight.zero_()
        torch.testing.assert_close(packed.hidden(ids), want, atol=1e-5, rtol=1e-5)    # 4+ rows: the twins
        assert measured == []                                       # nothing measured for them
        for few, expected in ((one, want_one), (two, want_two)):    # 1-3 rows: the kernel measured fastest
            if kernel != "mkl":
                torch.testing.assert_close(packed.hidden(few), expected, atol=1e-5, rtol=1e-5)
            else:
                assert (packed.hidden(few) - expected).abs().max() > 0.1          # the (zeroed) weight
        assert measured == [(n, 1), (n, 2)]             # once per row count, over all of the model's Linears
        packed.hidden(one)
        packed.hidden(two)
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            packed.hidden(one)
        finally:
            torch.set_num_threads(threads)                          # one_thread is module-scoped: restore now
        assert measured == [(n, 1), (n, 2), (n, 1)]                 # again only for another thread count
    again = weight_layout.apply(packed, "row")            # another layout undoes the packing
    assert weight_layout.layout_of(again) == "row" and "packed_weight" not in vars(again.lm_head)
    with torch.no_grad():
        assert (again.hidden(ids) - want).abs().max() > 0.1            # now the zeroed weights are what it reads


@pytest.mark.parametrize("layout", ["column", "packed"])
def test_layout_decodes_the_same_greedy_text(layout):
    row, column = both_layouts(layout)
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


@pytest.mark.parametrize("layout", ["column", "packed"])
def test_draft_vocabulary_rows_follow_the_heads_layout(layout):
    row, other = both_layouts(layout)
    vocab = DraftVocab(torch.tensor([7, 3, 200, 41]))
    states = torch.randn(2, row.cfg.hidden_size)
    torch.testing.assert_close(vocab.logits(other, states), vocab.logits(row, states), atol=1e-5, rtol=1e-5)
    vocab.logits(other, states)
    ((copied, twin, _, few_rows),) = vocab._weights.values()
    assert weight_layout.is_column_major(copied) and copied.shape == (4, row.cfg.hidden_size)
    assert (twin is not None and twin.is_mkldnn and twin.shape == copied.shape) == (layout == "packed")
    assert few_rows is getattr(other.lm_head, "few_row_kernel", None)     # the head's kernel choice


@pytest.mark.parametrize("flags, expected", [([], "packed"), (["--weight-layout", "row"], "row"),
                                             (["--weight-layout", "column"], "column"),
                                             (["--dtype", "bf16"], "row"), (["--dtype", "bf16", "--weight-layout",
                                                                             "column"], "column")])
def test_shared_inference_flags_apply_the_layout_at_load(flags, expected):
    """What inference.generate / benchmark / evaluate load: auto means packed for fp32 on this CPU."""
    import argparse

    from inference.cli import add_model_args, check_model_args, model_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--preset", "tiny", "--random-init", "--device", "cpu", *flags])
    check_model_args(args)
    model = model_from_args(args, cache_len=32)[0]
    assert weight_layout.layout_of(model) == expected
    head = model.lm_head.weight
    assert head.stride() == ((1, head.shape[0]) if expected in ("column", "packed") else (head.shape[1], 1))
    assert (getattr(model.lm_head, "packed_weight", None) is not None) == (expected == "packed")


def test_packed_layout_with_two_ranks_is_refused_before_loading(monkeypatch):
    import argparse

    from inference.cli import UsageError, add_model_args, check_model_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    monkeypatch.setenv("WORLD_SIZE", "2")                 # as under torchrun --nproc-per-node 2
    args = parser.parse_args(["--preset", "tiny", "--random-init", "--tp", "2", "--weight-layout", "packed"])
    with pytest.raises(UsageError, match="packed needs a CPU with oneDNN"):
        check_model_args(args)


def test_auto_packs_only_when_the_twins_fit_in_memory(monkeypatch):
    """`packed` keeps a second copy of every Linear weight: auto falls back to column when it would not fit."""
    from inference import loading

    row = random_model(seed=3)
    need = weight_layout.twin_bytes(row)
    assert need == sum(m.weight.numel() * 4 for m in weight_layout.linears(row))
    monkeypatch.setattr(loading, "memory_available", lambda device: 3 * need)
    assert weight_layout.apply_flag(copy.deepcopy(row), "auto", "cpu", torch.float32) == "packed"
    monkeypatch.setattr(loading, "memory_available", lambda device: need)
    model = copy.deepcopy(row)
    assert weight_layout.apply_flag(model, "auto", "cpu", torch.float32) == "column"
    assert weight_layout.layout_of(model) == "column"
    with pytest.raises(ValueError, match="packed needs .* GiB more for the packed copies"):
        weight_layout.apply_flag(copy.deepcopy(row), "packed", "cpu", torch.float32)


def test_few_row_kernels_agree_and_the_measurement_picks_one():
    _, packed = both_layouts("packed")
    head = packed.lm_head
    with torch.no_grad():
        for rows in (1, 2, 3):
            x = torch.randn(rows, head.weight.shape[1])
            for run in strides.FEW_ROW_KERNELS.values():
                torch.testing.assert_close(run(x, head.weight, head.packed_weight, None), x @ head.weight.t(),
                                           atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    assert head.few_row_kernel.measure(2, rounds=2) in strides.FEW_ROW_KERNELS
    assert torch.equal(torch.rand(3), want)                 # the global generator (seeded decoding) untouched
    assert all(m.few_row_kernel is head.few_row_kernel for m in weight_layout.linears(packed))   # one per model
