"""Shared test helpers and small configs, imported normally: `from tests.helpers import SMALL, cli`.

Fixtures that build things (the tokenized corpus, tokenizers) live in tests/conftest.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT2 = str(ROOT / "assets/tokenizers/gpt2")
SOTU_BPE = str(ROOT / "assets/tokenizers/sotu-bpe-8k")
SOTU_CORPUS = str(ROOT / "assets/corpus/sotu.jsonl.zst")

# The tiny preset shrunk further: one process trains a step in well under a second (overrides for pretrain.train).
SMALL_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
               "model.ffn_hidden_size=128", "model.max_seq_len=64"]
SMALL = SMALL_MODEL + ["train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4",
                       "train.eval_interval=3", "train.eval_iters=2", "train.log_interval=1", "train.warmup_steps=2"]
QUIET = ["log.plot=false", "log.tensorboard=false"]
# Variables a launcher sets; a test that starts its own ranks removes them first.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra) -> dict:
    """os.environ without launcher/Slurm variables, one OMP thread, this checkout first on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def cli(*args, check=True, env=None, timeout=600):
    """`python ARGS` from the repository root; with check, a non-zero exit fails with the output's tail."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_back(prefix):
    """(documents as id lists, dtype) of a Megatron indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds.index.dtype


def expected_ids(tok, texts):
    return [tok.encode(t) + [tok.eos_token_id] for t in texts]


def write_jsonl(path, texts, subset="S", zst=False):
    import zstandard
    data = b"".join(json.dumps({"text": t, "meta": {"pile_set_name": subset}}).encode() + b"\n" for t in texts)
    Path(path).write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)
    return path


def corpus_docs(name="sotu", limit=None):
    """Documents of a bundled corpus (assets/corpus/NAME.jsonl.zst), streamed."""
    import io

    import zstandard
    with open(ROOT / f"assets/corpus/{name}.jsonl.zst", "rb") as f:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for i, line in enumerate(lines):
            if limit is not None and i >= limit:
                return
            yield json.loads(line)["text"]


def tiny_benchmark(out: Path, *flags: str, repeats: int = 1) -> dict:
    """inference.benchmark on the random-init tiny preset (prompt 8, 9 new tokens, one thread) writing `out`;
    returns the report. Torch's thread count is restored afterwards (the benchmark's --threads sets it)."""
    import torch

    from inference import benchmark

    before = torch.get_num_threads()
    try:
        assert benchmark.main(["--preset", "tiny", "--random-init", "--prompt-len", "8", "--new-tokens", "9",
                               "--repeats", str(repeats), "--threads", "1", *flags, "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return json.loads(Path(out).read_text())
