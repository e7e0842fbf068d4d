"""Module-only training speed: a recyclable module trained on a frozen base (recycle.detach_base=true).

    python benchmarks/module_training.py --output module_tiny.json [--preset tiny] [--recycle-layers 1]
    python benchmarks/module_training.py --like runs/smollm2-recycle --configs depth2_base,bf16_base,draft_vocab,recipe \
        --threads 2 --output runs/bench/module_training_smollm2.json      # the real-model recipe's choices

Configurations, each the trainer's step (pretrain.runtime.build_runtime, then Trainer.train_step's work),
built in one process and timed in interleaved repeats like benchmarks/train_throughput.py (whose timing
functions this reuses; CPU: one thread and the process CPU-time clock):

  before         the frozen-base step as main had it before the base ran without autograd (commit fcae805):
                 the base's forward with autograd on (h.detach() before the module) and the module's logits
                 sliced for its last position; the same weights, optimizer and engine
  after          today's step: base under torch.no_grad(), module inputs without their last position
  target_base    after, with recycle.target=base (KL to the base's distribution at i+1)
  depth2         after, with recycle.train_depth=2 (the module unrolled once more on its own state)
  depth2_base    target=base and train_depth=2: configs/smollm2-recycle.yaml's step before the two below
  bf16_base      depth2_base with recycle.base_bf16 (the frozen base's forward under bf16 autocast)
  draft_vocab    depth2_base with recycle.draft_vocab=--draft-vocab (the module's head and loss over V' tokens)
  recipe_v4      both, as the v4 recipe ran them: the base's forward under bf16 autocast, its logits over the
                 whole vocabulary and its own cross-entropy computed (the plain forward, which validation runs)
  teacher_autocast   recipe_v4 with the teacher pass (model/frozen_base.py): logits over the draft rows only, no
                 base cross-entropy; bf16 still by autocast
  teacher        the teacher pass on bf16 copies of the base's weights
  recipe         configs/smollm2-recycle.yaml's step as of v5: teacher, and the module's step under bf16 autocast
                 (recycle.module_bf16)
  like           the recycle section of --like's config.yaml as it is (recycle.base_bf16 / module_bf16 = auto
                 resolved on this machine, as the trainer resolves them)

--like RUN_DIR takes the model shapes (not the weights: speed does not depend on them) from a run's config,
e.g. the imported SmolLM2-135M, whose 49152-token head is where a draft vocabulary pays most.

Reported per configuration: tokens/s (median and best repeat), the bytes autograd saves for the backward
pass in one forward (torch.autograd.graph.saved_tensors_hooks), and the speed relative to `before`, paired
within each repeat.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_throughput import make_batches, measure, train_section  # noqa: E402
from model.config import PRESETS, preset  # noqa: E402
from model.frozen_base import FrozenBase  # noqa: E402

DEPTH2_BASE = {"target": "base", "train_depth": 2}
CONFIGS = {"before": {}, "after": {}, "target_base": {"target": "base"}, "depth2": {"train_depth": 2},
           "depth2_base": DEPTH2_BASE, "bf16_base": {**DEPTH2_BASE, "base_bf16": True},
           "draft_vocab": {**DEPTH2_BASE, "draft_vocab": True}}
RECIPE = {**DEPTH2_BASE, "base_bf16": True, "draft_vocab": True}
CONFIGS.update(recipe_v4=RECIPE, teacher_autocast=RECIPE, teacher=RECIPE, recipe={**RECIPE, "module_bf16": True},
               like=None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--recycle-layers", type=int, default=1)
    p.add_argument("--like", metavar="RUN_DIR", help="the model shapes of this run's config.yaml instead of --preset")
    p.add_argument("--draft-vocab", type=int, default=4096, help="V' of the draft_vocab and recipe configs")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    args.configs = args.configs.split(",")
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}; valid: {','.join(CONFIGS)}")
    if "like" in args.configs and not args.like:
        p.error("--configs like: give the run whose recycle section to take, --like RUN_DIR")
    # what benchmarks.train_throughput's helpers read
    args.device, args.dtype, args.zero_stage = "cpu", "fp32", 0
    args.clock = "cpu" if args.threads == 1 else "wall"
    return args


def legacy_forward(self, input_ids, labels, loss_mask=None):
    """RecycleGPT.forward with a frozen base as of commit fcae805 (for `before` only)."""
    from model.objective import masked_mean
    h = self.hidden(input_ids)
    lm_logits = self.lm_head(h)
    rec_logits = self.lm_head(self.recycle_hidden(h.detach(), labels))
    lm_loss = masked_mean(self.spec.cross_entropy(lm_logits, labels), loss_mask)
    rec_loss = masked_mean(self.spec.cross_entropy(rec_logits[:, :-1], labels[:, 1:]), loss_mask[:, 1:])
    from model.objective import LossOutput
    return LossOutput(lm_loss + self.objective.weight * rec_loss, lm_loss, rec_loss)


def model_section(args):
    from pretrain.config import ModelSection, load_config

    if args.like:
        section = load_config(str(Path(args.like) / "config.yaml")).model
        overrides = {**section.overrides, "recycle_layers": args.recycle_layers}
        return ModelSection(section.preset, overrides)
    overrides = {"recycle_layers": args.recycle_layers, "max_seq_len": max(args.seq_len, preset(args.preset).max_seq_len)}
    return ModelSection(args.preset, overrides)


def build(name: str, args, run_dir: str):
    from pretrain.config import RecycleSection, RunConfig, RunSection, load_config
    from pretrain.runtime import build_runtime

    from model.draft_vocab import FILE_NAME, DraftVocab

    if name == "like":
        recycle = asdict(load_config(str(Path(args.like) / "config.yaml")).recycle)
        recycle.pop("detach_base")
    else:
        recycle = dict(CONFIGS[name])
        if recycle.get("draft_vocab"):
            recycle["draft_vocab"] = args.draft_vocab
    if recycle.get("draft_vocab"):
        # The V' ids only pick rows; which ones does not change the cost. Written where the trainer looks for them.
        DraftVocab(torch.arange(recycle["draft_vocab"])).save(Path(run_dir) / FILE_NAME)
    cfg = RunConfig(model=model_section(args), train=train_section(args), run=RunSection(run_dir),
                    recycle=RecycleSection(detach_base=True, **recycle), seed=args.seed)
    rt = build_runtime(cfg)
    rt.engine.train()
    model = rt.engine.module
    if name == "before":
        model.forward = legacy_forward.__get__(model)
    if name == "recipe_v4":
        model.frozen = None          # the plain forward
    elif name == "teacher_autocast":
        model.frozen = FrozenBase(bf16=True, copy_weights=False)

    def step(batch):
        out = rt.train_batch([batch])
        rt.grad_norm()
        return out.loss.item()
    return step, model


def saved_bytes(model, batch) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch["tokens"], batch["labels"], batch["loss_mask"])
    del out
    return total[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from parallel.setup import destroy

    cfg = model_section(args).build()
    batches = make_batches(cfg, args, "cpu")
    steps, saved = {}, {}
    with tempfile.TemporaryDirectory() as run_dir:
        for name in args.configs:
            steps[name], model = build(name, args, run_dir)
            saved[name] = saved_bytes(model, batches[0])
    print(f"{args.like or args.preset} + {args.recycle_layers}-layer module, frozen base, seq {args.seq_len} x {args.micro_batch}, "
          f"{args.threads} thread(s), {args.clock} clock", flush=True)
    times = measure(steps, batches, args)[args.clock]
    tokens = args.micro_batch * args.seq_len
    ref = args.configs[0]
    rows = {}
    for name, ts in times.items():
        tps = [tokens / t for t in ts]
        rows[name] = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_best": max(tps),
                      "step_s_all": ts, "saved_for_backward_mb": saved[name] / 2 ** 20,
                      f"speed_vs_{ref}": statistics.median(r / t for r, t in zip(times[ref], ts))}
    print(f"\n{'config':<14}{'tok/s median':>14}{'tok/s best':>12}{'saved MB':>10}{'vs ' + ref:>18}")
    for name, r in rows.items():
        print(f"{name:<14}{r['tokens_per_s_median']:>14,.0f}{r['tokens_per_s_best']:>12,.0f}"
              f"{r['saved_for_backward_mb']:>10.1f}{r[f'speed_vs_{ref}']:>17.3f}x")
    if args.output:
        result = {"benchmark": "module_training", "args": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()},
                  "model": asdict(cfg), "configs": rows}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.output)
        print(f"wrote {args.output}")
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
