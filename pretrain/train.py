"""python -m pretrain.train --config configs/X.yaml [section.key=value ...]

Runs plain (one process), or under torchrun / the deepspeed launcher / srun (environment variables).
Config errors are one line on stderr and exit code 2, before any process group starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pretrain.config import ConfigError, RunConfig, load_config


def check_inputs(cfg: RunConfig):
    """Everything that can be checked without a process group: files exist, shapes divide."""
    for entry in list(cfg.data.prefixes) + list(cfg.data.valid_prefixes):
        prefix = entry[1] if isinstance(entry, (list, tuple)) else entry
        for ext in (".bin", ".idx"):
            if not Path(f"{prefix}{ext}").is_file():
                raise ConfigError(f"data prefix {prefix}: {prefix}{ext} not found; create it with "
                                  f"python -m data_prep.tokenize --input FILE --tokenizer {cfg.data.tokenizer} "
                                  f"--output-prefix {prefix.removesuffix('_text_document')}")
    if not (Path(cfg.data.tokenizer) / "tokenizer.json").is_file() and not \
            (Path(cfg.data.tokenizer) / "tokenizer_config.json").is_file():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} is not a Hugging Face tokenizer folder "
                          "(no tokenizer.json); point it at one, e.g. assets/tokenizers/sotu-bpe-8k")
    from data_prep.datasets import load_tokenizer
    vocab = len(load_tokenizer(cfg.data.tokenizer))
    model_vocab = cfg.model.build().vocab_size
    if vocab > model_vocab:
        raise ConfigError(f"data.tokenizer has {vocab} tokens but model.vocab_size={model_vocab}; "
                          f"set model.vocab_size={-(-vocab // 64) * 64} or use a smaller tokenizer")
    from pretrain.runtime import saved_draft_vocab, validate_parallel
    validate_parallel(cfg)
    saved_draft_vocab(cfg)


def setup_logging(rank: int):
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML file, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=200 parallel.tp=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pretrain.trainer import StopRequested, Trainer, TrainingAborted
    StopRequested.install()   # before the slow start-up, so an early SLURM warning is honoured at step 1
    from pretrain.runtime import build_runtime

    from parallel.setup import RendezvousError, launcher_env
    # Before the start-up, whose own lines (the draft vocabulary's count) would otherwise be dropped; the rank
    # comes from the launcher's environment, as build_runtime reads it.
    setup_logging(int({**os.environ, **launcher_env()}["RANK"]))
    try:
        runtime = build_runtime(cfg)
    except RendezvousError as e:   # the ranks cannot meet: one line and exit 1, not a 30-minute hang
        print(f"error: {e}", file=sys.stderr)
        return 1
    shapes = cfg.model.build()      # the preset's name alone hides an imported model's own shapes
    params = shapes.num_parameters()
    logging.getLogger("recyclegpt.train").info(
        "run %s: %s%s (%d layers, hidden %d, vocab %d, %d-layer module; %.1fM + %.1fM parameters), "
        "world %d (tp %d, pp %d, dp %d), zero %d, %s", cfg.run.dir, cfg.model.preset,
        " with overrides" if cfg.model.overrides else "", shapes.num_layers, shapes.hidden_size,
        shapes.vocab_size, shapes.recycle_layers, params["base"] / 1e6, params["recycle"] / 1e6,
        runtime.world_size, cfg.parallel.tp, cfg.parallel.pp, runtime.dp_size, cfg.parallel.zero_stage,
        "bf16" if runtime.bf16 else "fp32")
    try:
        outcome = Trainer(cfg, runtime).fit()
    except TrainingAborted as e:
        logging.getLogger("recyclegpt.train").error("training aborted: %s", e)
        print(f"error: training aborted: {e}", file=sys.stderr)
        return 1
    runtime.shutdown()
    return 0 if outcome == "done" or outcome.startswith("stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
