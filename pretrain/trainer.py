"""The training loop: micro-batches -> DeepSpeed engine -> metrics, evaluation, checkpoints, resume."""
from __future__ import annotations

import logging
import math
import shutil
import signal
import time

import torch

from parallel.setup import any_rank
from pretrain import checkpoint
from pretrain.config import RunConfig, save_config
from pretrain.data import Batches, build_run_datasets
from pretrain.metrics import MetricsLogger, plot_losses

log = logging.getLogger("recyclegpt.train")


class TrainingAborted(RuntimeError):
    """The run cannot usefully continue; the message says why and what to do."""


class StopRequested:
    """SIGTERM/SIGUSR1 (SLURM pre-emption, scancel --signal) set a flag; the loop saves at the next step."""

    _installed = None

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    @classmethod
    def install(cls) -> "StopRequested":
        """Install once per process, as early as possible: a warning during start-up is kept, not lost."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg: RunConfig, runtime):
        """runtime: the parallel side (engine, dp size/rank, is_logging_rank, device), built by pretrain.train."""
        self.cfg, self.rt = cfg, runtime
        self.engine = runtime.engine
        self.run_dir = cfg.run_dir
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        self.train_set, self.valid_set = build_run_datasets(cfg, runtime.dp_size)
        self.step, self.consumed = 0, 0

    # ------------------------------------------------------------------------------------ set-up
    def prepare_run_dir(self):
        if self.rt.is_logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            tok_dst = self.run_dir / "tokenizer"
            if not tok_dst.exists():
                tmp = self.run_dir / "tokenizer.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(self.cfg.data.tokenizer, tmp)
                tmp.replace(tok_dst)

    def resume(self):
        client = checkpoint.load(self.engine, checkpoint.checkpoint_dir(self.run_dir))
        if client:
            self.step, self.consumed = client["step"], client["consumed_samples"]
            log.info("resumed from %s at step %d (%d samples consumed)",
                     checkpoint.latest_tag(checkpoint.checkpoint_dir(self.run_dir)), self.step, self.consumed)

    # ------------------------------------------------------------------------------------- steps
    def train_step(self, batches: Batches) -> dict:
        micro = [batches.next() for _ in range(self.engine.gradient_accumulation_steps())]
        out = self.rt.train_batch(micro)
        self.consumed += self.cfg.train.global_batch_size
        return {**scalars(out), "grad_norm": self.rt.grad_norm()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.valid_set is None:
            return {}
        t = self.cfg.train
        batches = Batches(self.valid_set, 0, t.micro_batch_size, self.rt.dp_rank, self.rt.dp_size)
        out = self.rt.eval_batch([batches.next() for _ in range(t.eval_iters)])
        row = scalars(out)
        row["ppl"] = math.exp(min(row["lm_loss"], 50.0))
        return row

    def save(self):
        meta = {"model": self.cfg.model.build().to_dict(), "run_dir": str(self.run_dir),
                "layout": checkpoint.layout_meta(self.engine)}
        checkpoint.save(self.engine, self.run_dir, self.step, self.consumed, meta, self.cfg.checkpoint.keep_last)
        log.info("saved checkpoint step_%d", self.step)

    # -------------------------------------------------------------------------------------- loop
    def fit(self) -> str:
        """Train to cfg.train.steps (a total, so a rerun resumes); returns 'done' or 'stopped:<SIGNAL>'."""
        t = self.cfg.train
        self.prepare_run_dir()
        self.resume()
        metrics = MetricsLogger(self.run_dir, self.rt.is_logging_rank, self.cfg.log.tensorboard, self.step)
        stop = StopRequested.install()
        batches = Batches(self.train_set, self.consumed, t.micro_batch_size, self.rt.dp_rank, self.rt.dp_size)
        bad_in_a_row, last_saved = 0, self.step
        start_step, t0 = self.step, time.perf_counter()
        while self.step < t.steps:
            tic = time.perf_counter()
            stats = self.train_step(batches)
            self.step += 1
            dt = time.perf_counter() - tic
            if not math.isfinite(stats["loss"]):
                bad_in_a_row += 1
                log.warning("step %d: non-finite loss %s, update skipped (%d in a row)", self.step, stats["loss"],
                            bad_in_a_row)
                if bad_in_a_row >= t.max_bad_steps:
                    raise TrainingAborted(f"{bad_in_a_row} non-finite losses in a row at step {self.step}: lower "
                                       "train.lr, check the data, or resume from an earlier checkpoint")
            else:
                bad_in_a_row = 0
            if self.step % t.log_interval == 0 or self.step == t.steps:
                row = {"step": self.step, **stats, "lr": self.engine.get_lr()[0],
                       "tokens_per_s": self.tokens_per_step / dt,
                       "consumed_samples": self.consumed}
                row.update(self.rt.throughput(self.tokens_per_step / dt))
                metrics.log(row)
                self._progress(row, start_step, t0)
            if self.step % t.eval_interval == 0 or self.step == t.steps:
                ev = self.evaluate()
                if ev:
                    metrics.log({"step": self.step, "split": "valid", **ev})
                    log.info("step %d valid: lm %.4f  recycle %.4f  ppl %.1f", self.step, ev["lm_loss"],
                             ev["recycle_loss"], ev["ppl"])
            if any_rank(stop.signal is not None):
                self.save()
                log.info("RECYCLEGPT_STOPPED_FOR_REQUEUE: received %s, saved step_%d, exiting cleanly",
                         stop.signal or "a stop request", self.step)
                metrics.close()
                return f"stopped:{stop.signal}"
            if self.step % self.cfg.checkpoint.interval == 0 or self.step == t.steps:
                self.save()
                last_saved = self.step
        if last_saved != self.step:
            self.save()
        metrics.close()
        if self.rt.is_logging_rank and self.cfg.log.plot:
            plot_losses(self.run_dir)
        return "done"

    def _progress(self, row: dict, start_step: int, t0: float):
        if not self.rt.is_logging_rank:
            return
        done = self.step - start_step
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(done, 1) * (self.cfg.train.steps - self.step)
        # NaN: no module (recycle), or a frozen base's training step, which skips the base's loss (lm)
        lm, rec = ("-" if math.isnan(row[k]) else f"{row[k]:.4f}" for k in ("lm_loss", "recycle_loss"))
        log.info("step %d/%d  loss %.4f  lm %s  rec %s  lr %.2e  gnorm %.2f  %.0f tok/s  eta %s",
                 self.step, self.cfg.train.steps, row["loss"], lm, rec, row["lr"], row["grad_norm"],
                 row["tokens_per_s"], _fmt_seconds(eta))


def scalars(out) -> dict:
    """metrics.jsonl values of a LossOutput: loss, lm_loss, recycle_loss (NaN without a module) and
    recycle_loss_d2.. for the deeper draft depths (recycle.train_depth)."""
    return {k: math.nan if v is None else v.item() for k, v in out.named().items()}


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
