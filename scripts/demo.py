"""`make demo`: tokenize the bundled corpus, train the tiny preset, generate in both modes, summarise.

    PYTHONPATH=. python scripts/demo.py [--config configs/tiny.yaml] [section.key=value ...]

Each stage is the user-facing command run as a subprocess, so the demo shows exactly what a user runs.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "The state of the Union is"


def run(cmd: list[str]):
    print(f"\n$ {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(f"demo: step failed (exit {result.returncode}): {' '.join(cmd)}")


def unigram_baseline(cfg) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training split's unigram distribution
    (add-one smoothed): the loss a model that ignores context would reach."""
    from pretrain.data import build_run_datasets

    train, valid = build_run_datasets(cfg, dp_size=1)
    vocab = cfg.model.build().vocab_size
    counts = np.ones(vocab, dtype=np.float64)
    for doc in np.unique(train.document_index):
        counts += np.bincount(train.dataset[int(doc)], minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    n = cfg.train.eval_iters * cfg.train.micro_batch_size
    labels = np.concatenate([np.asarray(valid[i]["labels"]) for i in range(n)])
    return float(-logp[labels].mean())


def generate_both_modes(run_dir: Path) -> dict:
    from inference.decoding import greedy_generate
    from pretrain.checkpoint import load_for_inference

    model, tok = load_for_inference(run_dir)
    ids = tok.encode(PROMPT)
    greedy_generate(model, ids, "standard", 8)  # warm-up: first calls pay for allocation
    gens = {}
    for mode in ("standard", "recycle"):
        print(f"$ python -m inference.generate --model {run_dir} --prompt {PROMPT!r} --mode {mode} --max-new-tokens 64")
        gen = greedy_generate(model, ids, mode, 64, eos_id=tok.eos_token_id)
        print(f"  {PROMPT}{tok.decode(gen.tokens)!r}\n  [{gen.stats.tokens_per_s:.1f} tokens/s]")
        gens[mode] = {"stats": gen.stats.to_dict()}
    return gens


def main(argv=None):
    parser = argparse.ArgumentParser(prog="scripts/demo.py")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    t0 = time.time()
    py = sys.executable

    from pretrain.config import load_config
    cfg = load_config(args.config, args.overrides)
    prefix = cfg.data.prefixes[0] if isinstance(cfg.data.prefixes[0], str) else cfg.data.prefixes[0][1]

    print("== 1/3 data: tokenize the bundled State of the Union corpus (skipped if already done)")
    run([py, "-m", "data_prep.tokenize", "--input", "assets/corpus/sotu.jsonl.zst",
         "--tokenizer", cfg.data.tokenizer, "--output-prefix", prefix])
    baseline = unigram_baseline(cfg)
    print(f"unigram baseline on the validation split: {baseline:.3f} nats/token (ppl {math.exp(baseline):.0f})")

    print(f"\n== 2/3 train: {cfg.model.preset} preset, {cfg.train.steps} steps (a rerun resumes from latest)")
    t_train = time.time()
    run([py, "-m", "pretrain.train", "--config", args.config, *args.overrides])
    t_train = time.time() - t_train

    print("\n== 3/3 generate: standard vs recycle decoding from the trained checkpoint")
    gens = generate_both_modes(cfg.run_dir)

    from pretrain.metrics import read_metrics
    rows = read_metrics(cfg.run_dir)
    train_row = [r for r in rows if r.get("split", "train") == "train"][-1]
    valid_row = [r for r in rows if r.get("split") == "valid"][-1]
    print("\n" + "=" * 78)
    print(f"demo summary ({time.time() - t0:.0f} s total, training {t_train:.0f} s)")
    print(f"  run directory        {cfg.run_dir}")
    print(f"  train (step {train_row['step']})     lm {train_row['lm_loss']:.3f}   recycle {train_row['recycle_loss']:.3f}")
    print(f"  valid (step {valid_row['step']})     lm {valid_row['lm_loss']:.3f}   recycle {valid_row['recycle_loss']:.3f}"
          f"   ppl {valid_row['ppl']:.1f}")
    print(f"  unigram baseline     {baseline:.3f}   -> valid lm is {baseline - valid_row['lm_loss']:.2f} nats/token better")
    for mode, g in gens.items():
        print(f"  {mode:9s} decoding   {g['stats']['tokens_per_s']:.1f} tokens/s  "
              f"({g['stats']['full_forwards']} full forwards for {g['stats']['new_tokens']} tokens)")
    print(f"  loss curves          {cfg.run_dir / 'loss_curves.png'}")
    print(f"  TensorBoard          .venv/bin/tensorboard --logdir {cfg.run_dir / 'tensorboard'}")
    print("=" * 78)
    if valid_row["lm_loss"] >= baseline:
        sys.exit("demo: the validation loss did not get below the unigram baseline")


if __name__ == "__main__":
    main()
