"""Training-side datasets: megatron-core GPT/Blended datasets from DataConfig, with and without a process group."""
import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy
import pytest
import torch
import zstandard

from data_prep import tokenize
from data_prep.datasets import DataConfig, build_datasets, parse_blend

ROOT = Path(__file__).resolve().parent.parent
TOK = str(ROOT / "assets/tokenizers/sotu-bpe-8k")
SEQ = 64


def corpus_slice(name, n):
    with open(ROOT / f"assets/corpus/{name}.jsonl.zst", "rb") as f:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return [json.loads(next(lines))["text"][:6000] for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small indexed datasets (SOTU and Brown excerpts) and their document counts."""
    root = tmp_path_factory.mktemp("data")
    counts = {}
    for name, n in (("sotu", 100), ("brown", 100)):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_slice(name, n)))
        assert tokenize.main(["--input", str(src), "--tokenizer", TOK, "--output-prefix", str(root / name),
                              "--workers", "0", "--log-interval", "1000"]) == 0
        counts[name] = n
    return root, counts


def first_samples(ds, n=8):
    return numpy.stack([ds[i]["tokens"].numpy() for i in range(n)])


def test_items_shapes_shift_and_split_boundaries(data):
    root, counts = data
    cfg = DataConfig(prefixes=[str(root / "sotu")], tokenizer=TOK, cache_dir=str(root / "cache-a"))
    train, valid, test = build_datasets(cfg, SEQ, seed=1, num_samples=(200, 20, 0))
    assert test is None and len(train) >= 200 and len(valid) >= 20
    item = train[3]
    assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(item)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert item[key].shape == (SEQ,)
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert torch.equal(item["position_ids"], torch.arange(SEQ))
    # "98,2,0": the first round(0.98 * n) documents train, the rest validate; no document in both.
    n_train = round(0.98 * counts["sotu"])
    assert set(numpy.unique(train.document_index)) == set(range(n_train))
    assert set(numpy.unique(valid.document_index)) == set(range(n_train, counts["sotu"]))
    assert os.listdir(root / "cache-a")


def test_deterministic_for_a_seed_and_cache_reused(data):
    root, _ = data
    cfg = DataConfig(prefixes=[str(root / "sotu")], tokenizer=TOK, cache_dir=str(root / "cache-b"))
    a = first_samples(build_datasets(cfg, SEQ, seed=7, num_samples=(100, 0, 0))[0])
    files = sorted(os.listdir(root / "cache-b"))
    b = first_samples(build_datasets(cfg, SEQ, seed=7, num_samples=(100, 0, 0))[0])  # from the cache
    assert sorted(os.listdir(root / "cache-b")) == files
    fresh = DataConfig(prefixes=[str(root / "sotu")], tokenizer=TOK, cache_dir=str(root / "cache-c"))
    c = first_samples(build_datasets(fresh, SEQ, seed=7, num_samples=(100, 0, 0))[0])
    d = first_samples(build_datasets(fresh, SEQ, seed=8, num_samples=(100, 0, 0))[0])
    assert numpy.array_equal(a, b) and numpy.array_equal(a, c) and not numpy.array_equal(a, d)


def test_blend_proportions_and_default_cache_dir(data):
    root, _ = data
    cfg = DataConfig(prefixes=[[0.7, str(root / "sotu")], [0.3, str(root / "brown")]], tokenizer=TOK,
                     split="90,10,0")
    train, valid, _ = build_datasets(cfg, SEQ, seed=3, num_samples=(1000, 100, 0))
    ids = numpy.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert len(train) == 1000 and abs((ids == 0).mean() - 0.7) < 0.02
    valid_ids = numpy.array([int(valid[i]["dataset_id"]) for i in range(len(valid))])
    assert abs((valid_ids == 0).mean() - 0.7) < 0.05
    # a sample tagged with dataset k is that dataset's sample
    k, j = int(train.dataset_index[5]), int(train.dataset_sample_index[5])
    assert torch.equal(train[5]["tokens"], train.datasets[k][j]["tokens"])
    assert (root / "index-cache").is_dir() and os.listdir(root / "index-cache")


def test_separate_validation_corpus_and_eod_mask(data):
    root, _ = data
    cfg = DataConfig(prefixes=[str(root / "sotu")], valid_prefixes=[str(root / "brown")], tokenizer=TOK,
                     cache_dir=str(root / "cache-d"), eod_mask_loss=True)
    train, valid, test = build_datasets(cfg, SEQ, seed=1, num_samples=(50, 10, 0))
    assert test is None
    assert train.dataset_path == str(root / "sotu") and valid.dataset_path == str(root / "brown")
    eod = train.config.tokenizer.eod
    for i in range(20):
        item = train[i]
        assert torch.equal(item["loss_mask"] == 0, item["tokens"] == eod)


def test_missing_dataset_and_bad_blend_entries(tmp_path):
    with pytest.raises(ValueError, match=r"dataset .*nope not found .*`python -m data_prep.tokenize"):
        build_datasets(DataConfig(prefixes=[str(tmp_path / "nope")], tokenizer=TOK), SEQ, 1, (1, 0, 0))
    assert parse_blend([[2, "a.bin"], "b"]) == (["a", "b"], [2.0, 1.0])
    assert parse_blend(["only"]) == (["only"], None)
    with pytest.raises(ValueError, match="must be > 0"):
        parse_blend([[0, "a"], [1, "b"]])
    with pytest.raises(ValueError, match="no tokenizer in"):
        build_datasets(DataConfig(prefixes=["x"], tokenizer=str(tmp_path)), SEQ, 1, (1, 0, 0))


def _rank_main(rank, store, cfg, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    train, valid, _ = build_datasets(cfg, SEQ, seed=11, num_samples=(64, 8, 0))
    queue.put((rank, first_samples(train).tolist(), first_samples(valid, 4).tolist()))
    torch.distributed.destroy_process_group()


def test_two_rank_process_group_matches_single_process(data, tmp_path):
    root, _ = data
    cfg = DataConfig(prefixes=[[0.5, str(root / "sotu")], [0.5, str(root / "brown")]], tokenizer=TOK,
                     cache_dir=str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, tmp_path / "store", cfg, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (t, v)) for r, t, v in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "cache-single")})
    train, valid, _ = build_datasets(single, SEQ, seed=11, num_samples=(64, 8, 0))
    expected = (first_samples(train).tolist(), first_samples(valid, 4).tolist())
    assert results[0] == expected and results[1] == expected


def test_a_split_without_documents_is_one_clear_error(tmp_path):
    src = tmp_path / "five.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_slice("sotu", 5)))
    assert tokenize.main(["--input", str(src), "--tokenizer", TOK, "--output-prefix", str(tmp_path / "five"),
                          "--workers", "0", "--log-interval", "1000"]) == 0
    cfg = DataConfig(prefixes=[str(tmp_path / "five")], split="95,5,0", tokenizer=TOK)
    with pytest.raises(ValueError, match=r"data.split=95,5,0 leaves the valid split of .*five with none of its 5"):
        build_datasets(cfg, SEQ, 1, (8, 8, 0))
    # 60/40 gives both splits documents and builds.
    cfg.split = "60,40,0"
    train, valid, _ = build_datasets(cfg, SEQ, 1, (8, 8, 0))
    assert len(train) >= 8 and len(valid) >= 8
