"""Typed, sectioned run configuration: YAML file + dotted `section.key=value` overrides.

Every error is one line naming the key and what would be valid, raised before any process group starts.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from data_prep.data_config import DataConfig
from model.config import PRESETS, ModelConfig, preset
from parallel.bf16_choice import check_setting as check_bf16_setting
from parallel.dims import check_precision, check_zero


class ConfigError(ValueError):
    """A bad config value; the message is meant to be shown to the user as is."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)   # any ModelConfig field, e.g. {recycle_layers: 2}

    def build(self) -> ModelConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r} is unknown; valid: {sorted(PRESETS)}")
        valid = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - valid)
        if unknown:
            raise ConfigError(f"model.{unknown[0]} is not a model field; valid: {sorted(valid)}")
        try:
            return preset(self.preset, **self.overrides)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    deepspeed_config: str = ""       # a user's DeepSpeed JSON, merged over the derived one


@dataclass
class TrainSection:
    steps: int = 100
    micro_batch_size: int = 8
    global_batch_size: int = 8       # = micro x accumulation x dp
    seq_length: int = 256
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"          # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    eval_interval: int = 50
    eval_iters: int = 4
    log_interval: int = 1
    max_bad_steps: int = 5           # consecutive NaN/inf losses before the run aborts


@dataclass
class RecycleSection:
    weight: float = 1.0              # lambda in L = L_lm + lambda * L_rec
    detach_base: bool = False        # True: train only the module on top of a frozen base (no autograd in it)
    target: str = "tokens"           # tokens: the corpus token | base: the full model's distribution | mix
    mix: float = 0.5                 # target=mix: share of the base-distribution term
    train_depth: int = 1             # the module unrolled on its own state this many times (multi-token drafts)
    depth_weights: list = field(default_factory=list)   # per-depth loss weights, train_depth of them; [] = all 1
    init: str = "random"             # a new module on an imported base: random | base_last_layers
    draft_vocab: int = 0             # V' > 0: the module's loss over the V' most frequent training tokens only
    # With detach_base: true | false | auto (bf16 where this machine multiplies it faster: parallel/bf16_choice.py).
    base_bf16: bool | str = False    # the frozen base's forward in bf16
    module_bf16: bool | str = False  # the module's forward and backward under bf16 autocast

    def objective(self):
        """The model's RecycleObjective (model/objective.py checks the values)."""
        from model.objective import RecycleObjective
        return RecycleObjective(weight=self.weight, target=self.target, mix=self.mix, depth=self.train_depth,
                                depth_weights=tuple(self.depth_weights))


@dataclass
class CheckpointSection:
    interval: int = 50
    keep_last: int = 3


@dataclass
class LogSection:
    tensorboard: bool = True
    plot: bool = True                # loss curves as PNG at the end of a run


@dataclass
class RunSection:
    dir: str = "runs/tiny"


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    recycle: RecycleSection = field(default_factory=RecycleSection)
    data: DataConfig = field(default_factory=DataConfig)   # data_prep's schema, not a copy
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    run: RunSection = field(default_factory=RunSection)
    seed: int = 1234

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)


# PyYAML reads YAML 1.1, where `3e-4` (no dot) is a string; YAML 1.2, JSON and every user read a number.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(key: str, value, typ):
    origin = typing.get_origin(typ) or typ
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    if origin is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    if origin in (int, float, str, list, dict) and (not isinstance(value, origin) or
                                                    (origin is int and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r} has type {type(value).__name__}; expected {origin.__name__}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, typ)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.steps=200)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _apply_override(tree: dict, path: list[str], value):
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    # `model.<field>=v` is shorthand for an override of the preset's field.
    if len(path) == 2 and path[0] == "model" and path[1] not in ("preset", "overrides"):
        tree.setdefault("model", {}).setdefault("overrides", {})[path[1]] = value
        return
    node[path[-1]] = value


# Keys that did nothing and were removed; a run directory saved before then still loads when they hold their old
# default. Any other value would have been silently ignored back then: say so.
REMOVED_KEYS = {("checkpoint", "load"): "", ("data", "num_workers"): 0}


def _drop_removed_keys(tree: dict):
    for (section, key), default in REMOVED_KEYS.items():
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            if node.pop(key) != default:
                raise ConfigError(f"{section}.{key} was never used and has been removed; delete it from the config")


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist; presets live in configs/*.yaml")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    model = tree.get("model") or {}
    # A YAML `model:` section may list fields next to `preset:`; they become overrides.
    if isinstance(model, dict):
        extra = {k: v for k, v in model.items() if k not in ("preset", "overrides")}
        tree["model"] = {"preset": model.get("preset", "tiny"),
                         "overrides": {**(model.get("overrides") or {}), **extra}}
    for text in overrides:
        _apply_override(tree, *parse_override(text))
    _drop_removed_keys(tree)
    cfg = _build(RunConfig, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig):
    t = cfg.train
    model_cfg = cfg.model.build()
    for key in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "eval_interval",
                "log_interval", "max_bad_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
    if t.seq_length > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_length={t.seq_length} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}")
    try:   # the rules live with the DeepSpeed config (parallel/), which applies them again to a user's JSON
        check_precision(t.precision)
        check_zero(cfg.parallel.zero_stage, cfg.parallel.pp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.checkpoint.interval < 1 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.interval and checkpoint.keep_last must be >= 1")
    if not cfg.data.prefixes:
        raise ConfigError("data.prefixes is empty; list tokenized datasets, e.g. "
                          "data.prefixes='[data/sotu_text_document]' (make them with python -m data_prep.tokenize)")
    validate_recycle(cfg.recycle, model_cfg, t.seq_length, cfg.parallel.tp)


def validate_recycle(r: RecycleSection, model_cfg, seq_length: int, tp: int = 1):
    if r.detach_base and model_cfg.recycle_layers == 0:
        raise ConfigError("recycle.detach_base=true needs a module: set model.recycle_layers >= 1")
    if model_cfg.recycle_layers == 0 and (r.train_depth != 1 or r.target != "tokens"):
        raise ConfigError("recycle.train_depth and recycle.target need a module: set model.recycle_layers >= 1")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in r.depth_weights):
        raise ConfigError(f"recycle.depth_weights={r.depth_weights!r} must be a list of numbers, e.g. [1.0, 0.5]")
    try:
        r.objective()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if r.init not in ("random", "base_last_layers"):
        raise ConfigError(f"recycle.init={r.init!r}; valid: random, base_last_layers")
    for key in ("base_bf16", "module_bf16"):
        try:
            check_bf16_setting(f"recycle.{key}", getattr(r, key))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if r.base_bf16 and not r.detach_base:
        raise ConfigError(f"recycle.base_bf16={str(r.base_bf16).lower()} runs a frozen base in bf16: set "
                          "recycle.detach_base=true too (a base that trains follows train.precision)")
    if r.module_bf16 and not r.detach_base:
        raise ConfigError(f"recycle.module_bf16={str(r.module_bf16).lower()} is mixed precision for a module on a "
                          "frozen base: set recycle.detach_base=true too (joint training follows train.precision)")
    if isinstance(r.draft_vocab, bool) or not isinstance(r.draft_vocab, int) or \
            not 0 <= r.draft_vocab <= model_cfg.vocab_size:
        raise ConfigError(f"recycle.draft_vocab={r.draft_vocab!r} must be an int between 0 (the whole vocabulary) "
                          f"and model.vocab_size={model_cfg.vocab_size}, e.g. 4096")
    if r.draft_vocab and model_cfg.recycle_layers == 0:
        raise ConfigError("recycle.draft_vocab needs a module: set model.recycle_layers >= 1")
    if r.draft_vocab and tp > 1:
        raise ConfigError(f"recycle.draft_vocab={r.draft_vocab} with parallel.tp={tp}: the LM head is split over "
                          "the vocabulary, so its draft rows are not on one rank; train the module with "
                          "parallel.tp=1 or recycle.draft_vocab=0")
    if r.train_depth + 1 > seq_length:
        raise ConfigError(f"recycle.train_depth={r.train_depth} needs train.seq_length >= {r.train_depth + 1} "
                          f"(got {seq_length})")


def save_config(cfg: RunConfig, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
