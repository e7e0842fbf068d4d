"""The parallel sizes of a run, validated before any process group starts (DESIGN.md §2b, §8).

One object owns tp, pp and dp. Ranks are laid out tensor-fastest, then data, then pipe — the order both
megatron-core (`order="tp-cp-ep-dp-pp"`) and DeepSpeed's `PipeModelDataParallelTopology` use:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Every error is a one-line `ValueError` naming the bad value and a valid choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from model.config import ModelConfig


# ------------------------------------------------------------------ layout rules (each checked here only)
PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str):
    """The value only: whether bf16 is usable is the machine's question (deepspeed_config.use_bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}; valid: {', '.join(PRECISIONS)}")


def check_zero(zero_stage: int, pp: int):
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero_stage}; valid: 0, 1, 2, 3")
    if pp > 1 and zero_stage > 1:
        raise ValueError(f"parallel.zero_stage={zero_stage} with parallel.pp={pp}: DeepSpeed's pipeline engine "
                         "supports ZeRO stage 0 or 1 only; use parallel.zero_stage=1, or parallel.pp=1 for ZeRO 2/3")


def check_detach_base(detach_base: bool, pp: int):
    if detach_base and pp > 1:
        # A frozen base leaves the stages before the last without gradients to send back, and DeepSpeed's
        # pipeline schedule always sends them.
        raise ValueError("recycle.detach_base=true with parallel.pp>1: DeepSpeed's pipeline backpropagates through "
                         "every stage, and with a frozen base no stage before the last has a gradient to send; "
                         "train the module with parallel.pp=1 (TP and ZeRO work)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt(values) -> str:
    return ", ".join(str(v) for v in values)


def launcher_world_size(environ=None) -> int:
    """The world size a launcher announced (torchrun/deepspeed, srun, mpirun), 1 without one."""
    env = os.environ if environ is None else environ
    for key in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(key):
            return int(env[key])
    return 1


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    pp: int = 1
    dp: int | None = None           # None: derived as world_size / (tp * pp)
    world_size: int | None = None   # None: tp * pp * dp, or the launcher's WORLD_SIZE when dp is None too

    def __post_init__(self):
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name}={value!r} must be an integer >= 1")
        if self.dp is not None and (not isinstance(self.dp, int) or self.dp < 1):
            raise ValueError(f"parallel.dp={self.dp!r} must be an integer >= 1 (or left out to derive it)")
        world = self.world_size
        if world is None:
            world = self.tp * self.pp * self.dp if self.dp is not None else launcher_world_size()
        if world < 1:
            raise ValueError(f"world size {world} must be >= 1")
        mp = self.tp * self.pp
        if world % mp:
            pairs = [(t, world // t // p) for t in _divisors(world) for p in _divisors(world // t)][:6]
            raise ValueError(f"parallel.tp={self.tp} x parallel.pp={self.pp} = {mp} does not divide the world size "
                             f"{world}; valid (tp, pp) for {world} processes: "
                             + ", ".join(f"({t}, {p})" for t, p in pairs))
        dp = world // mp
        if self.dp is not None and self.dp != dp:
            raise ValueError(f"parallel.tp={self.tp} x parallel.pp={self.pp} x dp={self.dp} = {mp * self.dp} "
                             f"processes, but the world size is {world}; use dp={dp} or launch {mp * self.dp} processes")
        object.__setattr__(self, "dp", dp)
        object.__setattr__(self, "world_size", world)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, model_cfg: ModelConfig | None = None, parallel=None, *, tp: int | None = None,
                    pp: int | None = None, world_size: int | None = None) -> "ParallelDims":
        """From a config section with `.tp`/`.pp` (or a dict, or keywords); validated against the model.

        world_size defaults to the launcher's (WORLD_SIZE / SLURM / OMPI), 1 when started plainly.
        """
        get = (lambda k: parallel.get(k)) if isinstance(parallel, dict) else (lambda k: getattr(parallel, k, None))
        tp = tp if tp is not None else (get("tp") if parallel is not None else None) or 1
        pp = pp if pp is not None else (get("pp") if parallel is not None else None) or 1
        dims = cls(tp=tp, pp=pp, world_size=world_size if world_size is not None else launcher_world_size())
        if model_cfg is not None:
            dims.validate_model(model_cfg)
        return dims

    # ------------------------------------------------------------------------------------ checks
    def validate_model(self, cfg: ModelConfig) -> "ParallelDims":
        """Every tensor-parallel split must be even, and every pipeline stage needs a decoder layer."""
        split = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                 "ffn_hidden_size": cfg.ffn_hidden_size, "vocab_size": cfg.vocab_size}
        valid_tp = [t for t in _divisors(self.world_size // self.pp) if all(v % t == 0 for v in split.values())]
        for key, value in split.items():
            if value % self.tp:
                raise ValueError(f"parallel.tp={self.tp} does not divide model.{key}={value}; "
                                 f"valid tp: {_fmt(valid_tp)}")
        if cfg.num_layers < self.pp:
            valid_pp = [p for p in _divisors(self.world_size // self.tp) if p <= cfg.num_layers]
            raise ValueError(f"parallel.pp={self.pp} exceeds model.num_layers={cfg.num_layers} (each stage needs a "
                             f"decoder layer); valid pp: {_fmt(valid_pp)}")
        return self

    def grad_accumulation(self, global_batch: int, micro_batch: int) -> int:
        """global batch = micro batch x accumulation x dp; returns the accumulation steps."""
        if micro_batch < 1 or global_batch < 1:
            raise ValueError(f"train.micro_batch_size={micro_batch} and train.global_batch_size={global_batch} "
                             "must both be >= 1")
        per_step = micro_batch * self.dp
        if global_batch % per_step:
            lower = max(per_step, global_batch // per_step * per_step)
            raise ValueError(f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size="
                             f"{micro_batch} x dp={self.dp} = {per_step}; valid: {lower} or {lower + per_step}")
        return global_batch // per_step

    # ---------------------------------------------------------------------------------- layout
    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} processes")
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp

    def rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def groups(self, axis: str) -> list[list[int]]:
        """All rank groups along one axis ('tp', 'dp' or 'pp'): the ranks that differ only there."""
        sizes = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        if axis not in sizes:
            raise ValueError(f"axis {axis!r}; valid: tp, dp, pp")
        out = {}
        for r in range(self.world_size):
            c = dict(zip(("pp", "dp", "tp"), self.coords(r)))
            key = tuple(v for k, v in c.items() if k != axis)
            out.setdefault(key, []).append(r)
        return list(out.values())

    def __str__(self) -> str:
        return f"world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp}"
