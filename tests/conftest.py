"""Session fixtures shared by every test file, and the `gpu` marker's skip.

- `sotu_prefix`: the bundled SOTU corpus tokenized once per session (sotu-bpe-8k), for training runs.
- `sotu_paragraphs_prefix`: ~150k characters of it, one document per paragraph (many documents, so the
  98/2 train/valid split has some in every part).
- `gpt2`, `sotu_bpe`: the two bundled tokenizers, loaded once.
Small configs and plain helpers are in tests/helpers.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import GPT2, SOTU_BPE, SOTU_CORPUS, corpus_docs


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped with a reason where there is none (never silently passed)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _tokenize(argv):
    from data_prep import tokenize
    assert tokenize.main([str(a) for a in argv] + ["--log-interval", "1000"]) == 0


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models in one process: a second intra-op thread only contends on a shared 2-core CPU (measured
    30 s vs 0.3 s per sampling case). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sotu_prefix(tmp_path_factory):
    out = tmp_path_factory.mktemp("sotu") / "sotu"
    _tokenize(["--input", SOTU_CORPUS, "--tokenizer", SOTU_BPE, "--output-prefix", out, "--workers", "0"])
    return str(out)


@pytest.fixture(scope="session")
def sotu_paragraphs_prefix(tmp_path_factory):
    out = tmp_path_factory.mktemp("sotu_paragraphs")
    docs, size = [], 0
    for text in corpus_docs("sotu"):
        for para in text.split("\n"):
            if para.strip():
                docs.append(para)
                size += len(para)
        if size > 150_000:
            break
    (out / "small.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    _tokenize(["--input", out / "small.jsonl", "--tokenizer", SOTU_BPE, "--output-prefix", out / "sotu",
               "--workers", "0"])
    return str(out / "sotu")


@pytest.fixture(scope="session")
def gpt2():
    from data_prep.hf_tokenizer import load_tokenizer
    return load_tokenizer(GPT2)


@pytest.fixture(scope="session")
def sotu_bpe():
    from data_prep.hf_tokenizer import load_tokenizer
    return load_tokenizer(SOTU_BPE)
