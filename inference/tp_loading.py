"""Tensor-parallel inference: `--tp` checked against the model before anything starts, the process groups,
and each rank's weights read shard by shard, so no rank ever holds the whole model (DESIGN.md §2c).

    torchrun --nproc-per-node 2 -m inference.generate --model RUN_DIR --tp 2 --prompt TEXT --mode verify

Order of work (every step is cheap until the last): the model's config alone (preset, RUN_DIR/config.yaml,
or HF config.json + safetensors key names) -> the TP divisibility check -> process groups -> an empty model
of this rank's shapes (built on the meta device, then allocated in the target dtype) -> its weights, one
parameter at a time:
- `--random-init`: the seeded one-device initialisation, replayed one full tensor at a time
  (`parallel.weights.init_state_dict`) and cut into this rank's slice;
- RUN_DIR: the resharding reader of any training layout (`parallel.ds_checkpoint.training_state` with this
  rank's tp_rank/tp_size), or the safetensors slices of an imported run's init/model.safetensors;
- HF folder: safetensors `safe_open(...).get_slice` of exactly this rank's rows/columns of each HF tensor
  (`pretrain.hf_convert.hf_sources` says which HF keys make each of our parameters).
"""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from inference.loading import load_tokenizer
from model.config import ModelConfig, preset
from pretrain.hf_dir import MODULE_FILE, ModelLoadError, weight_files


class TPError(ValueError):
    """--tp does not fit the launcher or the model; the message names the valid choices."""


# ------------------------------------------------------------------------------------------ before starting
def launcher_world_size() -> int:
    from parallel.dims import launcher_world_size as world
    return world()


def requested_tp(tp: int | None) -> int:
    """--tp, defaulting to the launcher's world size. Every process is one TP rank (no data-parallel copies
    of the same decode), so --tp must equal the number of processes started."""
    world = launcher_world_size()
    tp = world if tp is None else tp
    if tp < 1:
        raise TPError(f"--tp {tp} must be >= 1")
    if tp != world:
        raise TPError(f"--tp {tp} but the launcher started {world} process(es); each process is one tensor-parallel "
                      f"rank: launch {tp} (torchrun --nproc-per-node {tp}, srun -n {tp}) or pass --tp {world}")
    return tp


def _module_layers_in(path: Path, files: list[str]) -> int:
    from safetensors import safe_open

    layers = set()
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            layers |= {int(k.split(".")[2]) for k in f.keys() if k.startswith("recycle.layers.")}
    return len(layers)


def model_config(model_dir: str | None, preset_name: str | None) -> ModelConfig:
    """The model's shapes without reading any weights."""
    if preset_name:
        return preset(preset_name)
    path = Path(model_dir)
    if (path / "config.yaml").is_file():
        from pretrain.config import ConfigError, load_config
        try:
            return load_config(str(path / "config.yaml")).model.build()
        except (ConfigError, ValueError) as err:
            raise ModelLoadError(f"{path}/config.yaml: {err}") from None
    if (path / "config.json").is_file():
        from pretrain.hf_dir import model_config as hf_model_config

        hf = json.loads((path / "config.json").read_text())
        module = path / (hf.get("recycle_module_file") or MODULE_FILE)
        layers = _module_layers_in(path, [module.name]) if module.is_file() else 0
        return hf_model_config(hf, path, layers)
    raise ModelLoadError(f"{path} has neither config.yaml (a RUN_DIR from pretrain.train) nor config.json "
                         "(an HF_DIR from pretrain.export_hf); pass one of those")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp(cfg: ModelConfig, tp: int):
    """Every tensor-parallel split of the model must be even: query heads, KV heads, vocabulary, FFN width."""
    split = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size,
             "ffn_hidden_size": cfg.ffn_hidden_size}
    bad = [f"{k}={v}" for k, v in split.items() if v % tp]
    if bad:
        valid = [t for t in _divisors(cfg.num_kv_heads) if all(v % t == 0 for v in split.values())]
        raise TPError(f"--tp {tp} does not divide this model's {', '.join(bad)}; valid --tp: "
                      f"{', '.join(map(str, valid))}")


# ------------------------------------------------------------------------------------------ process groups
def start(tp: int):
    """Process groups for TP inference (gloo on CPU, NCCL on GPU); None for one process."""
    if tp == 1:
        return None
    from parallel.dims import ParallelDims
    from parallel.setup import init_distributed

    return init_distributed(ParallelDims(tp=tp, pp=1, world_size=tp))


def is_rank0() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gather(obj) -> list:
    """[obj of rank 0, rank 1, ...] on every rank ([obj] for one process)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def finish():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        from parallel.setup import destroy
        dist.barrier()
        destroy()


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ the empty shard
def empty_model(cfg: ModelConfig, dtype: torch.dtype, device, spec=None):
    """This rank's model with uninitialised parameters in `dtype` (no init draws, nothing full-sized)."""
    from model import RecycleGPT
    from model.spec import LocalSpec

    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)           # plain torch layers (norms, W_proj); megatron's use params_dtype
        with torch.device("meta"):
            model = RecycleGPT(cfg, spec or LocalSpec())
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    model.rotary._build(device)                  # buffers computed at construction were meta
    return model.eval()


def _slice_bounds(size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    part = size // tp_size
    return tp_rank * part, (tp_rank + 1) * part


@torch.no_grad()
def fill(model, tensors, cfg: ModelConfig, tp_rank: int, tp_size: int, full: bool):
    """Copy (name, tensor) pairs into the model's parameters; `full`: tensors are one-device tensors and only
    this rank's slice is copied (block by block for fused weights), else they are this rank's shard already."""
    from parallel.layout import tp_layout

    params = dict(model.named_parameters())
    layout = tp_layout(cfg) if full and tp_size > 1 else {}
    missing = set(params)
    for name, value in tensors:
        if name not in params:
            continue
        target = params[name]
        split = layout.get(name)
        if split is None:
            pieces = [(target, value)]
        else:
            dim, fused = split
            pieces, offset = [], 0
            for block in value.split(list(fused), dim) if fused else [value]:
                lo, hi = _slice_bounds(block.shape[dim], tp_rank, tp_size)
                pieces.append((target.narrow(dim, offset, hi - lo), block.narrow(dim, lo, hi - lo)))
                offset += hi - lo
        for dst, src in pieces:
            if dst.shape != src.shape:
                raise ModelLoadError(f"{name}: TP rank {tp_rank}/{tp_size} holds {tuple(dst.shape)} but the weights "
                                     f"give {tuple(src.shape)}; is the checkpoint from another model config?")
            dst.copy_(src)
        missing.discard(name)
    if missing:
        raise ModelLoadError(f"the weights lack {len(missing)} parameter(s) of this model, e.g. {sorted(missing)[:3]}")


# ------------------------------------------------------------------------------------------ weight sources
def random_tensors(cfg: ModelConfig, seed: int):
    """The seeded one-device weights, one full tensor at a time (`fill(..., full=True)` cuts the slice)."""
    from parallel.weights import init_state_dict
    return init_state_dict(cfg, seed)


def run_dir_tensors(path: Path, cfg: ModelConfig, tp_rank: int, tp_size: int):
    """This rank's shards from a RUN_DIR: the latest checkpoint of any training layout, or an imported run's
    init/model.safetensors (sliced)."""
    from pretrain.checkpoint import checkpoint_dir, latest_tag

    tag = latest_tag(checkpoint_dir(path))
    if tag is None:
        if (path / "init" / "model.safetensors").is_file():
            return _safetensors_slices(path / "init", ["model.safetensors"], {}, cfg, tp_rank, tp_size)
        raise ModelLoadError(f"{path} has no checkpoint (checkpoints/latest); train first with python -m "
                             f"pretrain.train ... run.dir={path}")
    from parallel.ds_checkpoint import training_state
    try:
        state = training_state(checkpoint_dir(path) / tag, cfg, None, tp_rank, tp_size)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not load {path}: {err}") from None
    return iter(state.weights.items())


def hf_dir_tensors(path: Path, cfg: ModelConfig, tp_rank: int, tp_size: int):
    """This rank's shards from an HF folder, read as safetensors slices."""
    from pretrain.hf_convert import hf_sources

    hf = json.loads((path / "config.json").read_text())
    files = weight_files(path)
    module = path / (hf.get("recycle_module_file") or MODULE_FILE)
    if module.is_file():
        files = files + [module.name]
    if not files:
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights; re-run pretrain.export_hf")
    return _safetensors_slices(path, files, hf_sources(cfg, with_module=cfg.recycle_layers > 0), cfg,
                               tp_rank, tp_size, tied=hf.get("tie_word_embeddings", True))


def _safetensors_slices(folder: Path, files: list[str], sources: dict, cfg: ModelConfig, tp_rank: int,
                        tp_size: int, tied: bool = False):
    """Yield (our name, this rank's shard) reading only that shard's rows/columns from the files.
    `sources`: our name -> the file keys concatenated along dim 0 ({}: the files use our names)."""
    from safetensors import safe_open

    from model.gpt import RecycleGPT
    from parallel.layout import tp_layout

    handles = [safe_open(str(folder / f), "pt") for f in files]
    where = {k: (h, k) for h in handles for k in h.keys()}
    if tied and "lm_head.weight" not in where and "model.embed_tokens.weight" in where:
        where["lm_head.weight"] = where["model.embed_tokens.weight"]
    layout = tp_layout(cfg) if tp_size > 1 else {}
    with torch.device("meta"):
        names = [n for n, _ in RecycleGPT(cfg).named_parameters()]
    for name in names:
        keys = sources.get(name, (name,))
        missing = [k for k in keys if k not in where]
        if missing:
            raise ModelLoadError(f"{folder} lacks {missing[0]} (for {name}); is it an export of another model?")
        dim, fused = layout.get(name, (None, None))
        parts = []
        for key in keys:
            handle, real_key = where[key]
            piece = handle.get_slice(real_key)
            if dim is None:
                parts.append(piece[:])
                continue
            # One stored tensor holding several fused blocks (our own names): each block's slice in turn.
            blocks = fused if fused and len(keys) == 1 else (piece.get_shape()[dim],)
            offset = 0
            for size in blocks:
                lo, hi = _slice_bounds(size, tp_rank, tp_size)
                parts.append(piece[offset + lo:offset + hi] if dim == 0 else piece[:, offset + lo:offset + hi])
                offset += size
        yield name, (torch.cat(parts, dim or 0) if len(parts) > 1 else parts[0])


# ------------------------------------------------------------------------------------------ all together
def load_shard(model_dir: str | None, preset_name: str | None, seed: int, dtype: torch.dtype, device,
               cfg: ModelConfig | None = None):
    """(this rank's model, tokenizer or None) after `start`; works for one process too (tp 1)."""
    from model.spec import LocalSpec

    cfg = cfg or model_config(model_dir, preset_name)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        from parallel.tensor_parallel import TensorParallelSpec
        spec = TensorParallelSpec(params_dtype=dtype)
    else:
        spec = LocalSpec()
    model = empty_model(cfg, dtype, device, spec)
    rank, size = spec.tp_rank, spec.tp_size
    tokenizer = None
    if preset_name:
        fill(model, random_tensors(cfg, seed), cfg, rank, size, full=True)
    else:
        path = Path(model_dir)
        if (path / "config.yaml").is_file():
            fill(model, run_dir_tensors(path, cfg, rank, size), cfg, rank, size, full=False)
            if (path / "tokenizer").is_dir():
                tokenizer = load_tokenizer(path / "tokenizer")
        else:
            fill(model, hf_dir_tensors(path, cfg, rank, size), cfg, rank, size, full=False)
            if (path / "tokenizer.json").exists():
                tokenizer = load_tokenizer(path)
    return model.eval(), tokenizer


def bytes_per_rank(cfg: ModelConfig, dtype: torch.dtype, cache_len: int, tp: int) -> int:
    """Weights plus both KV caches (batch 1) on one TP rank; norms and the module's W_proj are replicated."""
    d, size = cfg.hidden_size, torch.tensor([], dtype=dtype).element_size()
    replicated = (2 * cfg.num_layers + 1) * d
    if cfg.recycle_layers:
        replicated += 2 * d * d + 3 * d + 2 * cfg.recycle_layers * d
    params = (cfg.num_parameters()["total"] - replicated) // tp + replicated
    kv = 2 * (cfg.num_layers + cfg.recycle_layers) * (cfg.num_kv_heads // tp) * cfg.head_dim * cache_len
    return (params + kv) * size


def check_memory(cfg: ModelConfig, name: str, dtype: torch.dtype, device, cache_len: int, tp: int):
    """Fail before any weight exists when this host's ranks would not fit in its free memory."""
    from inference.loading import memory_available

    need = bytes_per_rank(cfg, dtype, cache_len, tp)
    ranks_here = local_world() if torch.device(device).type == "cpu" else 1
    have = memory_available(torch.device(device))
    if need * ranks_here > 0.9 * have:
        hint = "--dtype bf16, " if dtype == torch.float32 else ""
        raise ModelLoadError(f"--preset {name} at --tp {tp} needs about {need / 2**30:.1f} GiB per rank x {ranks_here} "
                             f"rank(s) here ({cfg.num_parameters()['total'] / 1e9:.2f}B parameters in "
                             f"{str(dtype).replace('torch.', '')}) but only {have / 2**30:.1f} GiB is free on {device}; "
                             f"use {hint}a smaller preset, more GPUs (--tp), or a GPU (--device cuda)")


def local_world() -> int:
    """Processes sharing this host's memory (torchrun/srun set LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE)."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return launcher_world_size()
