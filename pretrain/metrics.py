"""metrics.jsonl + TensorBoard scalars + a loss-curve PNG. Only the logging rank writes."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int):
        """On resume, drop rows a stopped run logged after its last checkpoint, so the file continues cleanly."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            split = row.get("split", "train")
            for key, value in row.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, row["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(run_dir: Path) -> Path | None:
    """loss_curves.png: train and valid, lm and recycle, against step."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for split, style in (("train", "-"), ("valid", "o--")):
        part = [r for r in rows if r.get("split", "train") == split]
        for key, colour in (("lm_loss", "tab:blue"), ("recycle_loss", "tab:orange")):
            pts = [(r["step"], r[key]) for r in part if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=f"{split} {key}", alpha=0.9 if split == "valid" else 0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"RecycleGPT training: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss_curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
