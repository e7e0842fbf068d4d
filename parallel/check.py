"""Equivalence check: a few optimizer steps of a small model under a parallel layout, and the same steps
on one process with plain torch. The distributed tests run it; it is also a smoke test for a launcher:

    torchrun --nproc-per-node 4 -m parallel.check --tp 2 --pp 2 --out /tmp/check
    deepspeed --num_gpus 2 --module parallel.check --zero 1,2,3 --out /tmp/check   # (GPU hosts)
    srun -n 4 python -m parallel.check --tp 2 --pp 2 --out /tmp/check

Every rank writes `rank{R}.pt` under --out (losses per step, and at step 0 the clipped gradient of its
embedding shard and the global grad norm); rank 0 then compares with the one-process run and prints the
largest relative differences (`--compare`, on by default under a launcher).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from model.config import ModelConfig
from model.gpt import RecycleGPT
from model.objective import RecycleObjective

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                  max_seq_len=32, recycle_layers=2)
SEED, LR, CLIP, WD = 1234, 1e-2, 1.0, 0.1


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 3)        # a warmup, so the schedule is exercised too


def param_groups(module: torch.nn.Module) -> list[dict]:
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(module):
    return torch.optim.AdamW(param_groups(module), lr=LR, betas=(0.9, 0.95), eps=1e-8)


def make_scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def global_micro_batches(step: int, global_batch: int, micro: int, seq: int, vocab: int) -> list[dict]:
    """All micro-batches of one optimizer step, in a fixed order; dp rank d takes d*gas .. d*gas+gas-1."""
    g = torch.Generator().manual_seed(1000 + step)
    # Learnable sequences (x_t = a + b t mod vocab), so a few steps move the losses well past the tolerance.
    a = torch.randint(0, vocab, (global_batch, 1), generator=g)
    b = torch.randint(1, 4, (global_batch, 1), generator=g)
    tokens = (a + b * torch.arange(seq + 1)) % vocab
    mask = (torch.rand(global_batch, seq, generator=g) > 0.15).float()   # some masked positions
    out = []
    for j in range(global_batch // micro):
        sl = slice(j * micro, (j + 1) * micro)
        out.append({"tokens": tokens[sl, :-1], "labels": tokens[sl, 1:], "loss_mask": mask[sl]})
    return out


def reference_run(steps: int, global_batch: int, micro: int, seq: int, cfg: ModelConfig = CFG,
                  detach_base: bool = False, objective: RecycleObjective = RecycleObjective()) -> dict:
    """The one-process result with DeepSpeed's semantics: loss / n_micro per micro-batch, clip, step."""
    torch.manual_seed(SEED)
    model = RecycleGPT(cfg)
    model.objective = objective
    if detach_base:
        model.freeze_base()
    opt, losses = make_optimizer(model), []
    sched = make_scheduler(opt)
    result = {}
    for step in range(steps):
        batches = global_micro_batches(step, global_batch, micro, seq, cfg.vocab_size)
        opt.zero_grad(set_to_none=True)
        acc = 0
        for b in batches:
            out = model(b["tokens"], b["labels"], b["loss_mask"])
            (out.loss / len(batches)).backward()
            acc = acc + out.vector().double()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if step == 0:
            result["grad_norm"] = float(norm)
            if model.embedding.weight.grad is not None:
                result["embedding_grad"] = model.embedding.weight.grad.clone()
        opt.step()
        sched.step()
        losses.append((acc / len(batches)).tolist())
    result["losses"] = losses
    model.eval()
    with torch.no_grad():
        evals = [model(b["tokens"], b["labels"], b["loss_mask"])
                 for b in global_micro_batches(steps, global_batch, micro, seq, cfg.vocab_size)]
    result["eval"] = (sum(o.vector().double() for o in evals) / len(evals)).tolist()
    result["logits"], result["recycle_logits"] = reference_logits(cfg)
    return result


def _probe(engine, param, record: dict):
    """Record `param`'s gradient as the optimizer sees it (after clipping) at the first step."""

    def hook(optimizer, args, kwargs):
        if "embedding_grad" not in record and param is not None and param.grad is not None:
            record["embedding_grad"] = param.grad.detach().clone()

    engine.optimizer.register_step_pre_hook(hook)


def run_layout(tp: int, pp: int, zero: int, steps: int, global_batch: int, micro: int, seq: int,
               save_dir: Path | None = None, detach_base: bool = False, activation_checkpointing: bool = False,
               bf16: bool = False, resume_at: int | None = None, scratch: Path | None = None,
               objective: RecycleObjective = RecycleObjective()) -> dict:
    """Train `steps` steps under one layout; with `resume_at`, save a DeepSpeed checkpoint after that many
    steps, drop the engine, build a fresh one (other seed) and continue from the checkpoint."""
    from megatron.core import parallel_state as ps

    from parallel.deepspeed_config import deepspeed_config
    from parallel.dims import ParallelDims
    from parallel.engine import build_engine, eval_batch, train_batch
    from parallel.setup import current

    ctx = current()
    dims = ParallelDims(tp=tp, pp=pp, world_size=ctx.dims.world_size)
    ds = deepspeed_config(dims, micro_batch=micro, global_batch=global_batch, grad_clip=CLIP, zero_stage=zero,
                          precision="bf16" if bf16 else "fp32")

    def new_engine(seed):
        return build_engine(CFG, dims, ds, seed, detach_base=detach_base, objective=objective,
                            activation_checkpointing=activation_checkpointing,
                            optimizer_factory=make_optimizer, scheduler_factory=make_scheduler)

    engine, module = new_engine(SEED)
    emb = module.embedding.weight if pp == 1 else dict(module.full_named_parameters()).get("embedding.weight")
    record = {"tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank, "zero": zero,
              "has_embedding": emb is not None, "losses": []}
    if zero == 0 and not bf16:
        _probe(engine, emb, record)
        if pp == 1:                           # decoding path: full-vocabulary logits gathered over TP
            with torch.no_grad():
                ids = probe_ids()
                h = module.hidden(ids)
                record["logits"] = module.logits(h)
                record["recycle_logits"] = module.logits(module.recycle_hidden(h[:, :-1], ids[:, 1:]))
    gas = engine.gradient_accumulation_steps()
    for step in range(steps):
        if step == resume_at:
            engine.save_checkpoint(str(scratch / f"resume_zero{zero}"), tag="mid")
            del engine, module
            engine, module = new_engine(SEED + 1)          # wrong weights until the checkpoint loads
            path, _ = engine.load_checkpoint(str(scratch / f"resume_zero{zero}"), tag="mid")
            assert path is not None, "checkpoint did not load"
            record["resumed_at"] = step
        batches = global_micro_batches(step, global_batch, micro, seq, CFG.vocab_size)
        mine = batches[ctx.dp_rank * gas:(ctx.dp_rank + 1) * gas]
        out = train_batch(engine, mine)
        record["losses"].append(out.vector().tolist())
        if step == 0:
            norm = engine.get_global_grad_norm()
            record["grad_norm"] = None if norm is None else float(norm)
    batches = global_micro_batches(steps, global_batch, micro, seq, CFG.vocab_size)   # unseen: evaluation
    ev = eval_batch(engine, batches[ctx.dp_rank * gas:(ctx.dp_rank + 1) * gas])
    record["eval"] = ev.vector().tolist()
    if save_dir is not None:
        engine.save_checkpoint(str(save_dir), tag="final")
        if zero != 3:                          # ZeRO-3 parameters are partitioned flat; no per-name shards
            from parallel.weights import local_state
            record["state"] = local_state(module)
    del engine
    assert ps.model_parallel_is_initialized()
    return record


def probe_ids() -> torch.Tensor:
    return torch.arange(2 * 12).view(2, 12) * 7 % CFG.vocab_size


def reference_logits(cfg: ModelConfig = CFG) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(SEED)
    model = RecycleGPT(cfg).eval()
    with torch.no_grad():
        ids = probe_ids()
        h = model.hidden(ids)
        return model.logits(h), model.logits(model.recycle_hidden(h[:, :-1], ids[:, 1:]))


def rel_diff(a, b) -> float:
    """Largest relative difference; NaN in both (a frozen base's training-step lm_loss) counts as equal."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff = (a - b).abs() / b.abs().clamp(min=1e-12)
    return float(torch.where(a.isnan() & b.isnan(), 0.0, diff).max())


def compare(records: list[dict], ref: dict, cfg: ModelConfig = CFG) -> dict:
    """Max relative differences of every rank's losses, and of the gathered embedding gradient."""
    from parallel.layout import unshard_tensor
    out = {}
    width = len(ref["losses"][0])
    if any(len(s) != width for r in records for s in r["losses"]):
        raise ValueError(f"the runs logged different numbers of losses than the reference ({width})")
    names = ["loss", "lm_loss", "recycle_loss"] + [f"recycle_loss_d{j}" for j in range(2, width - 1)]
    for col, name in enumerate(names):
        out[name] = max(rel_diff([s[col] for s in r["losses"]], [s[col] for s in ref["losses"]]) for r in records)
    if all("eval" in r for r in records) and "eval" in ref:
        out["eval"] = max(rel_diff(r["eval"], ref["eval"]) for r in records)
    norms = [r["grad_norm"] for r in records if r.get("grad_norm") is not None]
    if norms:
        out["grad_norm"] = max(rel_diff(n, ref["grad_norm"]) for n in norms)
    for key in ("logits", "recycle_logits"):
        got = [r[key] for r in records if key in r]
        if got:
            out[key] = max(float((g - ref[key]).abs().max() / ref[key].abs().max()) for g in got)
    with_grad = [r for r in records if "embedding_grad" in r] if "embedding_grad" in ref else []
    if with_grad:
        worst = 0.0
        for pp_rank in sorted({r["pp_rank"] for r in with_grad}):
            shards = sorted((r for r in with_grad if r["pp_rank"] == pp_rank and r["dp_rank"] == 0),
                            key=lambda r: r["tp_rank"])
            full = unshard_tensor([r["embedding_grad"] for r in shards], 0, None)
            g = ref["embedding_grad"]
            worst = max(worst, float((full - g).abs().max() / g.abs().max()))
        out["embedding_grad"] = worst        # max abs error relative to the largest gradient entry
        out["embedding_grad_stages"] = sorted({r["pp_rank"] for r in with_grad})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m parallel.check", description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero", default="0", help="ZeRO stages to run one after another, e.g. 1,2,3")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--save", action="store_true", help="also write a DeepSpeed checkpoint per ZeRO stage")
    p.add_argument("--detach-base", action="store_true", help="train only the recyclable module")
    p.add_argument("--target", default="tokens", help="recycle.target: tokens, base or mix (mix 0.5)")
    p.add_argument("--train-depth", type=int, default=1, help="recycle.train_depth")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--resume-at", type=int, help="save after this many steps and continue in a new engine")
    p.add_argument("--bf16", action="store_true", help="bf16 DeepSpeed engines, on a CPU too (emulates the GPU "
                   "path, which deepspeed_config only enables with CUDA)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)   # deepspeed launcher adds it
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from parallel.dims import ParallelDims
    from parallel.setup import destroy, init_distributed, seed_everything

    dims = ParallelDims.from_config(CFG, tp=args.tp, pp=args.pp)
    if args.bf16 and not torch.cuda.is_available():
        import parallel.deepspeed_config as dsc
        dsc.use_bf16 = lambda precision="auto": precision == "bf16"
    ctx = init_distributed(dims)
    seed_everything(SEED, dims)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = RecycleObjective(target=args.target, depth=args.train_depth,
                                 depth_weights=tuple(1.0 / j for j in range(1, args.train_depth + 1)))
    results, mismatch = {}, False
    for zero in (int(z) for z in args.zero.split(",")):
        record = run_layout(args.tp, args.pp, zero, args.steps, args.global_batch, args.micro_batch, args.seq,
                            out_dir / f"ckpt_zero{zero}" if args.save else None, args.detach_base,
                            args.activation_checkpointing, args.bf16, args.resume_at, out_dir, objective)
        torch.save(record, out_dir / f"zero{zero}_rank{ctx.rank}.pt")
        results[zero] = record
    torch.distributed.barrier()
    if args.compare and ctx.rank == 0:
        ref = reference_run(args.steps, args.global_batch, args.micro_batch, args.seq, detach_base=args.detach_base,
                            objective=objective)
        for zero in results:
            records = [torch.load(out_dir / f"zero{zero}_rank{r}.pt") for r in range(dims.world_size)]
            diffs = compare(records, ref)
            print(json.dumps({"tp": args.tp, "pp": args.pp, "dp": dims.dp, "zero": zero, **diffs}))
            bad = {k: v for k, v in diffs.items() if isinstance(v, float) and not v <= 1e-4}
            if bad:
                print(f"MISMATCH (relative tolerance 1e-4): {bad}")
                mismatch = True
    destroy()
    return 1 if mismatch else 0   # a launcher or CI script must see the failure, not only a printed line


if __name__ == "__main__":
    raise SystemExit(main())
