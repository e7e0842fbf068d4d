"""Training throughput: our DeepSpeed training step against a plain PyTorch loop on the same model.

    python benchmarks/train_throughput.py --output train.json [--preset tiny] [--seq-len 256] [--micro-batch 4]

Three configurations, built in one process and timed in interleaved repeats (the order rotates every repeat, so
drift in machine load hits all three alike):

  plain_hf      transformers `LlamaForCausalLM` (sdpa) with our base weights (pretrain.hf_convert.to_hf), torch
                AdamW with our hyperparameters and parameter groups, and the plain loop: loss = model(...).loss;
                loss.backward(); clip_grad_norm_; opt.step(); sched.step(); opt.zero_grad()
  ours_base     the trainer's path: a DeepSpeed engine from parallel.engine.build_engine (world size 1), pretrain.
                optim's optimizer and schedule, one step = parallel.engine.train_batch(engine, [batch]), i.e.
                engine(tokens, labels, loss_mask); engine.backward; engine.step. recycle_layers = 0, so the same
                network as plain_hf. Target: >= 0.95x plain_hf's tokens/s.
  ours_recycle  the same with the preset's recyclable module: its step-time cost next to its FLOP cost.

Per configuration: tokens/s (median and best repeat), step time on both clocks, TFLOP/s per device
(pretrain.flops.train_flops_per_token) and MFU where the GPU's peak is known. Ratios are paired: taken within
each repeat (adjacent in time), then the median. The first losses of plain_hf and ours_base must agree: that
shows both compute the same function from the same weights. docs/benchmarks.md explains how to read it all.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import PRESETS, ModelConfig, preset  # noqa: E402
from pretrain.config import TrainSection  # noqa: E402
from pretrain.flops import device_peak_tflops, train_flops_per_token  # noqa: E402

TARGET_RATIO = 0.95

# Command-line overrides of the preset's shape: flag -> ModelConfig field.
SHAPE_FLAGS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
               "ffn": "ffn_hidden_size", "vocab": "vocab_size", "recycle_layers": "recycle_layers"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    for flag, field in SHAPE_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=int, help=f"override the preset's {field}")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration before the repeats")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads; default on cpu: 1 (see --clock), on cuda: torch's choice")
    p.add_argument("--clock", choices=("wall", "cpu"), help="headline clock (both are recorded); default: cpu "
                   "(this process's CPU time, steady on a shared machine) with --threads 1 on a CPU device, else wall")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", type=Path, help="write the results as JSON here (and a PNG next to it)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cpu" and args.threads is None:
        args.threads = 1 if args.clock in (None, "cpu") else None
    args.clock = args.clock or ("cpu" if args.device == "cpu" and args.threads == 1 else "wall")
    if args.clock == "cpu" and (args.threads or torch.get_num_threads()) > 1:
        print("note: with several threads, CPU time counts their spin-waits; --threads 1 is steadier", file=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible")
    if args.device == "cpu" and torch.cuda.is_available():
        p.error("--device cpu on a machine with a GPU: the trainer takes the GPU whenever it sees one; hide it with "
                "CUDA_VISIBLE_DEVICES= to time the CPU path")
    if args.clock == "cpu" and args.device == "cuda":
        p.error("--clock cpu measures CPU work; on a GPU use the wall clock")
    if args.dtype == "bf16" and args.device == "cpu":
        p.error("--dtype bf16 needs --device cuda (our trainer runs fp32 on a CPU; parallel.deepspeed_config.use_bf16)")
    return args


def model_configs(args) -> dict[str, ModelConfig]:
    """The module's shape from the preset (or --recycle-layers); the base config is the same with N = 0."""
    overrides = {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items() if getattr(args, flag) is not None}
    cfg = preset(args.preset, **overrides)
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, args.seq_len))
    if cfg.recycle_layers == 0:
        raise SystemExit("the module's depth is 0 (--recycle-layers 0): nothing to compare ours_recycle with")
    return {"base": replace(cfg, recycle_layers=0), "recycle": cfg}


def make_batches(cfg: ModelConfig, args, device, count: int = 4) -> list[dict]:
    """A few fixed random batches, cycled: data loading is not what this measures."""
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(count):
        seq = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)
        out.append({"tokens": seq[:, :-1].contiguous().to(device), "labels": seq[:, 1:].contiguous().to(device),
                    "loss_mask": torch.ones(args.micro_batch, args.seq_len, device=device)})
    return out


def train_section(args) -> TrainSection:
    # The trainer's defaults (lr, betas, weight decay, clipping); warmup is short so the timed steps use a
    # representative learning rate, which does not change the work done.
    return TrainSection(steps=10 ** 6, micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch,
                        seq_length=args.seq_len, warmup_steps=1, precision=args.dtype)


# ------------------------------------------------------------------------------------ the three steps
def build_ours(cfg: ModelConfig, args, train: TrainSection, run_dir: str):
    """-> step function on the engine of pretrain.runtime.build_runtime, which pretrain.train calls: a process
    group (world size 1; parallel.setup fills in RANK, MASTER_PORT, ...), then parallel.engine.build_engine with
    pretrain.optim's optimizer and schedule. A step does Trainer.train_step's work: parallel.engine.train_batch,
    then the loss and the gradient norm read back for the log."""
    from pretrain.config import ModelSection, ParallelSection, RunConfig, RunSection
    from pretrain.runtime import build_runtime

    overrides = {k: v for k, v in asdict(cfg).items() if v != getattr(PRESETS[args.preset], k)}
    run_cfg = RunConfig(model=ModelSection(args.preset, overrides), train=train, run=RunSection(run_dir),
                        parallel=ParallelSection(zero_stage=args.zero_stage), seed=args.seed)
    rt = build_runtime(run_cfg)
    rt.engine.train()

    def step(batch):
        out = rt.train_batch([batch])
        rt.grad_norm()
        return out.loss.item()
    return step


def build_plain_hf(cfg: ModelConfig, our_state: dict, args, train: TrainSection):
    """-> step function for the plain loop on transformers' LlamaForCausalLM with our base weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.hf_convert import llama_config_kwargs, to_hf
    from pretrain.optim import make_scheduler, param_groups

    device = torch.device(args.device)
    model = LlamaForCausalLM(LlamaConfig(**llama_config_kwargs(cfg), attn_implementation="sdpa")).to(device)
    base, _ = to_hf(cfg, {k: v.detach().float() for k, v in our_state.items()})
    model.load_state_dict(base, strict=True)
    model.train()
    # Same decay/no-decay groups and betas as ours; fused kernel where ours gets one (on a GPU), so the
    # optimizer is not what differs. A plain loop's mixed precision is autocast over fp32 weights.
    opt = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=(train.beta1, train.beta2),
                            eps=1e-8, fused=device.type == "cuda" or None)
    sched = make_scheduler(opt, train)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(batch):
        with autocast:
            # shift_labels: our labels are already shifted (labels[i] = x_{i+1}), so HF's loss covers the same
            # T positions as ours instead of shifting again and dropping one; `labels` only switches the loss on.
            loss = model(input_ids=batch["tokens"], labels=batch["labels"], shift_labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()        # a plain loop logs its loss too: one host read per step on both sides
    return step


# ---------------------------------------------------------------------------------------- timing
def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_block(step, batches, n: int, device: str, start: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step over n steps. CPU time counts only this process's work: other jobs on
    a shared machine stretch wall time but hardly CPU time, as long as torch runs one thread (several threads
    spin-wait for each other when one is descheduled, and that counts as CPU time)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        step(batches[(start + i) % len(batches)])
    sync(device)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def measure(steps: dict, batches, args) -> dict[str, dict[str, list[float]]]:
    """-> {"wall": {config: [s/step per repeat]}, "cpu": {...}}."""
    for name, step in steps.items():
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    sync(args.device)
    times = {"wall": {name: [] for name in steps}, "cpu": {name: [] for name in steps}}
    names = list(steps)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            wall, cpu = timed_block(steps[name], batches, args.steps, args.device, r * args.steps)
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
        print(f"  repeat {r + 1}/{args.repeats} ({args.clock} clock): " + "  ".join(
            f"{n} {args.micro_batch * args.seq_len / times[args.clock][n][-1]:,.0f} tok/s" for n in names), flush=True)
    return times


# --------------------------------------------------------------------------------------- summary
def summarize(times: dict, cfgs: dict, args) -> dict:
    """Headline figures from the --clock clock; the other clock's step times and ratios are kept alongside."""
    tokens = args.micro_batch * args.seq_len
    peak = device_peak_tflops() if args.device == "cuda" else None
    flops = {"plain_hf": train_flops_per_token(cfgs["base"], args.seq_len),
             "ours_base": train_flops_per_token(cfgs["base"], args.seq_len),
             "ours_recycle": train_flops_per_token(cfgs["recycle"], args.seq_len)}
    rows = {}
    for name, ts in times[args.clock].items():
        tps = [tokens / t for t in ts]
        row = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_best": max(tps),
               "step_s_median": statistics.median(ts), "step_s_best": min(ts),
               "wall_step_s_all": times["wall"][name], "cpu_step_s_all": times["cpu"][name],
               "train_flops_per_token": flops[name],
               "tflops_per_device": flops[name] * statistics.median(tps) / 1e12}
        if peak:
            row["mfu"] = row["tflops_per_device"] / peak
        rows[name] = row

    def paired(a: str, b: str) -> dict:
        # Speed of a relative to b within each repeat (adjacent in time, so under the same machine load), then
        # the median over repeats; for both clocks, the headline one first.
        out = {}
        for clock in (args.clock, "cpu" if args.clock == "wall" else "wall"):
            ta, tb = times[clock][a], times[clock][b]
            ratios = [y / x for x, y in zip(ta, tb)]
            out[clock] = {"median": statistics.median(ratios), "best_over_best": min(tb) / min(ta), "all": ratios}
        return out

    base_vs_plain = paired("ours_base", "plain_hf")
    recycle_vs_base = paired("ours_recycle", "ours_base")
    module_speed = recycle_vs_base[args.clock]["median"]
    n = cfgs["recycle"].num_parameters()
    return {
        "clock": args.clock,
        "configs": rows,
        "ours_base_vs_plain_hf": base_vs_plain | {
            "target": TARGET_RATIO, "meets_target": base_vs_plain[args.clock]["median"] >= TARGET_RATIO},
        "recycle_module": {
            # Both as "extra over the base step", so the two numbers are directly comparable.
            "step_time_cost": 1 / module_speed - 1,
            "flops_cost": flops["ours_recycle"] / flops["ours_base"] - 1,
            "share_of_step_time": 1 - module_speed,
            "share_of_flops": 1 - flops["ours_base"] / flops["ours_recycle"],
            "share_of_parameters": n["recycle"] / n["total"],
            "speed_vs_ours_base": recycle_vs_base,
        },
        "peak_tflops": peak,
    }


def print_report(result: dict, args):
    s, clock = result["summary"], args.clock
    other = "cpu" if clock == "wall" else "wall"
    print(f"\n{args.preset} ({result['model']['recycle']['num_layers']} layers + "
          f"{result['model']['recycle']['recycle_layers']}-layer module), seq {args.seq_len} x micro-batch "
          f"{args.micro_batch}, {args.device} {args.dtype}, ZeRO {args.zero_stage}, {torch.get_num_threads()} "
          f"threads; {args.repeats} repeats x {args.steps} steps; figures from the {clock} clock")
    print(f"{'config':<14}{'tok/s median':>14}{'tok/s best':>12}{'step ms':>10}{other + ' ms':>10}"
          f"{'TFLOP/s':>10}{'MFU':>8}")
    for name, row in s["configs"].items():
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        other_ms = statistics.median(row[f"{other}_step_s_all"]) * 1e3
        print(f"{name:<14}{row['tokens_per_s_median']:>14,.0f}{row['tokens_per_s_best']:>12,.0f}"
              f"{row['step_s_median'] * 1e3:>10.1f}{other_ms:>10.1f}{row['tflops_per_device']:>10.3f}{mfu:>8}")
    r = s["ours_base_vs_plain_hf"]
    print(f"ours_base / plain_hf: {r[clock]['median']:.3f}x (paired median; best/best "
          f"{r[clock]['best_over_best']:.3f}x; {other} clock {r[other]['median']:.3f}x), "
          f"target >= {TARGET_RATIO}: {'met' if r['meets_target'] else 'NOT met'}")
    m = s["recycle_module"]
    print(f"recyclable module: {m['step_time_cost']:+.1%} step time for {m['flops_cost']:+.1%} FLOPs "
          f"({m['share_of_parameters']:.1%} of parameters)")
    c = result["loss_check"]
    print(f"first-step loss: plain_hf {c['plain_hf']:.6f}, ours_base {c['ours_base']:.6f} "
          f"(|diff| {c['abs_diff']:.2e}; equal means both compute the same function)")


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]["configs"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bars = ax.bar(names, [rows[n]["tokens_per_s_median"] for n in names], color=["#999999", "#1f77b4", "#ff7f0e"])
    best = [rows[n]["tokens_per_s_best"] for n in names]
    ax.scatter(names, best, marker="_", s=400, color="black", label="best repeat", zorder=3)
    clock = result["summary"]["clock"]
    for bar, n in zip(bars, names):   # paired, as in the printed report
        ratio = statistics.median(p / t for t, p in zip(rows[n][f"{clock}_step_s_all"],
                                                         rows["plain_hf"][f"{clock}_step_s_all"]))
        ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="top", xytext=(0, -6), textcoords="offset points", color="white", fontweight="bold")
    a = result["args"]
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(f"{a['preset']}, seq {a['seq_len']} x {a['micro_batch']}, {a['device']} {a['dtype']}, "
                 f"{a['clock']} clock", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, title="in bars: speed vs plain_hf", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from model import RecycleGPT
    from parallel.setup import destroy

    cfgs, train = model_configs(args), train_section(args)
    batches = make_batches(cfgs["base"], args, args.device)
    print(f"building: ours_recycle, ours_base (DeepSpeed, ZeRO {args.zero_stage}), plain_hf (transformers)",
          flush=True)
    with tempfile.TemporaryDirectory() as run_dir:    # build_runtime looks for an imported init/ there; none
        ours_recycle = build_ours(cfgs["recycle"], args, train, run_dir)
        ours_base = build_ours(cfgs["base"], args, train, run_dir)
    # build_engine's weights are the seeded one-device model's on every layout; take them from there, not from
    # the engine (under ZeRO 3 it holds only partitions).
    torch.manual_seed(args.seed)
    plain_hf = build_plain_hf(cfgs["base"], RecycleGPT(cfgs["base"]).state_dict(), args, train)
    steps = {"plain_hf": plain_hf, "ours_base": ours_base, "ours_recycle": ours_recycle}

    # Same weights, same batch: the first losses must agree (before any update, so no optimizer detail matters).
    loss_check = {name: float(steps[name](batches[0])) for name in ("plain_hf", "ours_base")}
    loss_check["abs_diff"] = abs(loss_check["plain_hf"] - loss_check["ours_base"])

    print(f"timing: {args.warmup} warm-up + {args.repeats} x {args.steps} steps each, interleaved", flush=True)
    times = measure(steps, batches, args)
    result = {
        "benchmark": "train_throughput",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {k: asdict(c) | {"parameters": c.num_parameters()} for k, c in cfgs.items()},
        "tokens_per_step": args.micro_batch * args.seq_len,
        "loss_check": loss_check,
        "summary": summarize(times, cfgs, args),
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "device_name": torch.cuda.get_device_name() if args.device == "cuda"
                else platform.processor() or platform.machine()},
    }
    print_report(result, args)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
        if not args.no_plot:
            png = args.output.with_suffix(".png")
            plot(result, png)
            print(f"wrote {png}")
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
