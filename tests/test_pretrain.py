"""End to end on one process: the training CLI on a small tiny-preset variant, resume, config errors."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMALL, cli

pytestmark = pytest.mark.slow   # the training CLI, end to end


def train(run_dir, prefix, *extra, check=True):
    return cli("-m", "pretrain.train", "--config", "configs/tiny.yaml", *SMALL, f"data.prefixes=[{prefix}]",
               f"run.dir={run_dir}", *extra, check=check)


def rows(run_dir, split="train"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


def test_train_writes_metrics_tensorboard_checkpoints(tmp_path, sotu_prefix):
    train(tmp_path, sotu_prefix, "train.steps=6", "checkpoint.interval=3")
    train_rows = rows(tmp_path)
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    for key in ("step", "loss", "lm_loss", "recycle_loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(isinstance(r[key], (int, float)) for r in train_rows), key
    assert train_rows[-1]["lm_loss"] < train_rows[0]["lm_loss"]
    valid = rows(tmp_path, "valid")
    assert [r["step"] for r in valid] == [3, 6] and all("ppl" in r for r in valid)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_6"
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_sigterm_saves_and_rerun_resumes_to_identical_metrics(tmp_path, sotu_prefix):
    steps = ["train.steps=14", "checkpoint.interval=5", "train.eval_interval=4"]
    train(tmp_path / "full", sotu_prefix, *steps)
    split = tmp_path / "split"
    cmd = [sys.executable, "-m", "pretrain.train", "--config", "configs/tiny.yaml", *SMALL,
           f"data.prefixes=[{sotu_prefix}]", f"run.dir={split}", *steps]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:            # SIGTERM as SLURM does before a pre-emption, mid-run
        log.append(line)
        if "step 2/14" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, "".join(log[-30:])
    assert any("RECYCLEGPT_STOPPED_FOR_REQUEUE" in line for line in log), "".join(log[-30:])
    stopped_at = int((split / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= stopped_at < 14
    train(split, sotu_prefix, *steps)   # the same command resumes from latest
    keys = ("step", "split", "loss", "lm_loss", "recycle_loss", "lr", "grad_norm", "consumed_samples")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs]
    full_rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    split_rows = [json.loads(l) for l in (split / "metrics.jsonl").read_text().splitlines()]
    assert strip(split_rows) == strip(full_rows)


def test_trained_run_loads_for_inference(tmp_path, sotu_prefix):
    from inference.decoding import greedy_generate
    from pretrain.checkpoint import load_for_inference

    train(tmp_path, sotu_prefix, "train.steps=2")
    model, tok = load_for_inference(tmp_path)
    out = greedy_generate(model, tok.encode("The Congress"), "recycle", 6)
    assert len(out.tokens) == 6


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key train.stepz"),
    ("train.steps=abc", "train.steps='abc' has type str; expected int"),
    ("model.preset=huge", "model.preset='huge' is unknown"),
    ("data.prefixes=[nowhere/corpus]", "nowhere/corpus.bin not found"),
    ("train.global_batch_size=5", "train.global_batch_size=5 is not a multiple"),
    ("model.num_heads=3", "hidden_size=64 is not divisible by num_heads=3"),
])
def test_config_errors_are_one_line_before_training(tmp_path, sotu_prefix, override, message):
    proc = train(tmp_path / "run", sotu_prefix, override, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr
    assert not (tmp_path / "run").exists()


NAN_INJECTOR = """
import sys
from model.gpt import RecycleGPT
original, calls = RecycleGPT.forward, [0]
bad = {int(c) for c in sys.argv[1].split(",")}
def forward(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    if self.training:
        calls[0] += 1
        if calls[0] in bad or (-1 in bad and calls[0] > 2):
            return out._replace(loss=out.loss * float("nan"))
    return out
RecycleGPT.forward = forward
from pretrain.train import main

sys.exit(main(sys.argv[2:]))
"""


def test_nan_loss_skips_the_update_and_k_in_a_row_abort(tmp_path, sotu_prefix):
    base = ["--config", "configs/tiny.yaml", *SMALL, f"data.prefixes=[{sotu_prefix}]", "train.max_bad_steps=3"]
    # Micro-batch call 5 is the first half of step 3 (2 micro-batches per step).
    proc = cli("-c", NAN_INJECTOR, "5", *base, f"run.dir={tmp_path / 'one'}", "train.steps=5")
    assert "step 3: non-finite loss nan, update skipped (1 in a row)" in proc.stdout
    losses = [r["loss"] for r in rows(tmp_path / "one")]
    assert losses[2] != losses[2] and all(x == x for i, x in enumerate(losses) if i != 2)  # only step 3 is NaN
    assert losses[4] < losses[1]          # the skipped update left the weights usable: training went on

    proc = cli("-c", NAN_INJECTOR, "-1", *base, f"run.dir={tmp_path / 'many'}", "train.steps=8", check=False)
    assert proc.returncode == 1
    assert "error: training aborted: 3 non-finite losses in a row at step 4" in proc.stderr


CLIP_NORM_REUSE = """
import sys, torch
from pretrain.config import load_config
from pretrain.runtime import build_runtime
rt = build_runtime(load_config("configs/tiny.yaml", sys.argv[1:]))
def second_pass(*args, **kwargs):
    raise AssertionError("the non-finite check took a second pass over the gradients")
torch._foreach_norm = second_pass
ids = torch.randint(0, 8192, (2, 65))
batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 64)}
before = rt.engine.module.layers[0].mlp.linear_fc2.weight.detach().clone()
rt.train_batch([batch, batch])
moved = not torch.equal(before, rt.engine.module.layers[0].mlp.linear_fc2.weight)
print("updated" if moved else "not updated", rt.engine.optimizer.skipped_steps)
"""


@pytest.mark.slow
def test_non_finite_check_reuses_the_clipping_norm(tmp_path):
    proc = cli("-c", CLIP_NORM_REUSE, *SMALL, "data.prefixes=[unused]", f"run.dir={tmp_path}")
    assert proc.stdout.strip().splitlines()[-1] == "updated 0"


@pytest.mark.slow
def test_draft_depth_run_logs_every_depth_and_resumes_to_identical_metrics(tmp_path, sotu_prefix):
    """recycle.train_depth=2 with target=mix through the CLI: recycle_loss_d2 in train and valid rows, and a
    run stopped at step 2 and resumed to 4 logs what a straight run to 4 logs (constant LR after warmup, so
    the schedule does not depend on train.steps)."""
    extra = ["recycle.train_depth=2", "recycle.target=mix", "recycle.depth_weights=[1.0, 0.5]",
             "train.eval_interval=2", "checkpoint.interval=2", "train.min_lr=0.0003", "train.lr=0.0003"]
    train(tmp_path / "full", sotu_prefix, "train.steps=4", *extra)
    train(tmp_path / "split", sotu_prefix, "train.steps=2", *extra)
    train(tmp_path / "split", sotu_prefix, "train.steps=4", *extra)
    keys = ("step", "split", "loss", "lm_loss", "recycle_loss", "recycle_loss_d2", "grad_norm")
    strip = lambda run: [{k: r.get(k) for k in keys} for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                                                      .splitlines())]
    full = strip(tmp_path / "full")
    assert all(isinstance(r["recycle_loss_d2"], float) for r in full) and any(r["split"] == "valid" for r in full)
    assert strip(tmp_path / "split") == full


@pytest.mark.slow
def test_a_draft_vocabulary_run_counts_its_shards_once_and_keeps_them(tmp_path, sotu_prefix):
    """recycle.draft_vocab with a frozen bf16 base: RUN_DIR/draft_vocab.safetensors holds the training shards'
    most frequent tokens, a resume trains over the same file, a different size is one error line, and
    decoding drafts over it by default (inference.generate names the file; --draft-vocab none does not)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from model.draft_vocab import DraftVocab

    extra = ["recycle.draft_vocab=64", "recycle.detach_base=true", "recycle.base_bf16=true", "recycle.target=base",
             "recycle.train_depth=2"]
    first = train(tmp_path, sotu_prefix, "train.steps=2", *extra)
    assert "draft vocabulary: 64 tokens cover" in first.stdout, first.stdout    # the count is logged, not silent
    saved = DraftVocab.load(tmp_path / "draft_vocab.safetensors").token_ids
    data = IndexedDataset(sotu_prefix)
    counts = np.bincount(np.concatenate([np.asarray(data[i]) for i in range(len(data))]))
    assert len(saved) == 64 and counts[saved.numpy()].min() >= np.sort(counts)[-64]
    rows_before = rows(tmp_path)
    assert all(np.isfinite(r["recycle_loss_d2"]) for r in rows_before)
    written = (tmp_path / "draft_vocab.safetensors").stat()
    train(tmp_path, sotu_prefix, "train.steps=3", *extra)
    again = (tmp_path / "draft_vocab.safetensors").stat()     # a resume reads it back, never rewrites it
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    proc = train(tmp_path, sotu_prefix, "train.steps=4", *extra[1:], "recycle.draft_vocab=32", check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "holds 64 tokens but recycle.draft_vocab=32" in err[0], proc.stderr
    prompt = ["--model", str(tmp_path), "--prompt", "The Congress", "--max-new-tokens", "6", "--mode", "verify"]
    own = cli("-m", "inference.generate", *prompt)
    assert "drafting over " + str(tmp_path / "draft_vocab.safetensors") in own.stderr
    whole = cli("-m", "inference.generate", *prompt, "--draft-vocab", "none")
    assert "drafting over" not in whole.stderr and whole.stdout == own.stdout   # lossless either way
    # An export carries it beside the module, decoding from the HF folder drafts over it, and an import brings
    # it back with recycle.draft_vocab set, so training on from there keeps the same rows.
    hf, again_run = tmp_path / "hf", tmp_path / "reimported"
    cli("-m", "pretrain.export_hf", "--checkpoint", str(tmp_path), "--output", str(hf))
    assert torch.equal(DraftVocab.load(hf / "draft_vocab.safetensors").token_ids, saved)
    from_hf = cli("-m", "inference.generate", *prompt[2:], "--model", str(hf))
    assert "drafting over " + str(hf / "draft_vocab.safetensors") in from_hf.stderr
    assert from_hf.stdout == own.stdout
    cli("-m", "pretrain.import_hf", "--hf", str(hf), "--output", str(again_run))
    assert torch.equal(DraftVocab.load(again_run / "draft_vocab.safetensors").token_ids, saved)
    assert "draft_vocab: 64" in (again_run / "config.yaml").read_text()

