"""Reading DeepSpeed checkpoint tags written under any (tp, pp, dp, ZeRO) layout, as one-device names:
`pipeline_state_dict(tag_dir, cfg)` (a pipeline tag's weights), `checkpoint_layout(tag_dir)` and
`training_state(tag_dir, cfg, keep, tp_rank, tp_size)` (fp32 weights and Adam moments, optionally cut to a TP
shard). Writing them into a live engine is parallel/engine_state.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from parallel.layout import (expected_keys, full_name, layer_prefixes, meta_shapes, shard_tensor,
                             stage_parameter_names, tp_layout, unshard_state_dicts, unshard_tensor)

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
OPTIMIZER_NAMES_KEY = "optimizer_param_names"   # client state of each model-parallel rank's model_states file


def pipeline_state_dict(tag_dir: str | Path, cfg: ModelConfig) -> dict:
    """The full fp32 state dict from a DeepSpeed pipeline checkpoint tag (`layer_XX-model_YY-model_states.pt`:
    XX the pipeline layer, YY the TP rank)."""
    tag_dir = Path(tag_dir)
    prefixes = layer_prefixes(cfg)
    per_tp: dict[int, dict] = {}
    for path in sorted(tag_dir.glob("layer_*-model_states.pt")):
        m = _LAYER_FILE.search(path.name)
        if not m:
            raise ValueError(f"unexpected pipeline checkpoint file {path.name} in {tag_dir}")
        layer, tp_rank = int(m.group(1)), int(m.group(2))
        if layer >= len(prefixes) or prefixes[layer] is None:
            raise ValueError(f"{path.name}: layer {layer} does not exist in a pipeline of this model config "
                             f"({len(prefixes)} layers); is the checkpoint from another model?")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        per_tp.setdefault(tp_rank, {}).update({prefixes[layer] + k: v.float() for k, v in sd.items()})
    if not per_tp:
        raise FileNotFoundError(f"{tag_dir} holds no pipeline layer files (layer_*-model_*-model_states.pt)")
    ranks = sorted(per_tp)
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{tag_dir}: TP ranks {ranks} are incomplete")
    full = unshard_state_dicts([per_tp[r] for r in ranks], cfg)
    want = expected_keys(cfg)
    if set(full) != want:
        diff = sorted(set(full) ^ want)[:3]
        raise ValueError(f"{tag_dir}: the layer files do not make a whole model (differs in e.g. {diff})")
    return full


def _file_may_hold(cfg: ModelConfig, prefixes, layer: int, keep) -> bool:
    names = expected_keys(cfg)
    if layer == 0:
        return keep("embedding.weight")
    if layer == len(prefixes) - 1:
        return any(keep(n) for n in names if n.startswith(("lm_head.", "recycle.")))
    return any(keep(n) for n in names if n.startswith(prefixes[layer]))


# ------------------------------------------------------------------------------------------------------------
# Training checkpoints between layouts: weights *and* Adam moments.
#
# A DeepSpeed tag stores the optimizer in one of four shapes, depending on the layout that wrote it:
#   ZeRO 0, fp32    mp_rank_XX_model_states.pt["optimizer"]: a torch state dict, one entry per parameter of
#                   the rank's module (TP shard, pipeline stage), numbered in param-group order
#   ZeRO 0, bf16    the same file, FP16_UnfusedOptimizer's dict: fp32 masters ("fp32_groups") + torch state
#   ZeRO 1/2 (and   zero_pp_rank_D_mp_rank_XX_optim_states.pt: per param group one flat fp32 partition per dp
#   BF16_Optimizer) rank, its moments, and "param_slice_mappings" (name -> (start, numel) in that partition)
#   ZeRO 3          the same file names: per sub-group flat partitions ("fp32_flat_groups"), every parameter
#                   split evenly (padded) over the dp ranks, in the order of the model states' param_shapes
# XX is the model-parallel rank, pp_stage * tp + tp_rank. Each reader below turns one XX into
# {one-device name: this TP rank's tensor}; TP ranks are then unsharded with the weights' rules.

@dataclass
class TrainingState:
    """A checkpoint's fp32 weights and Adam moments under the one-device names: the full tensors, or this
    rank's TP shard of them when `tp_shard` = (tp_rank, tp_size). `exp_avg`/`exp_avg_sq` are None when the
    checkpoint has no (readable) moments; `step` is Adam's step count."""
    weights: dict
    exp_avg: dict | None = None
    exp_avg_sq: dict | None = None
    step: float | None = None
    tp_shard: tuple[int, int] | None = None

    @property
    def has_moments(self) -> bool:
        return self.exp_avg is not None and self.exp_avg_sq is not None and self.step is not None


def _load_ds(path: Path) -> dict:
    # DeepSpeed's files hold its own classes (fragment_address, enums) besides tensors. mmap: tensors stay in
    # the page cache until used, so a rank materialises only what it keeps, one parameter at a time.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _model_states_path(tag_dir: Path, mp: int) -> Path:
    plain = tag_dir / f"mp_rank_{mp:02d}_model_states.pt"
    return plain if plain.is_file() else tag_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"


def _optim_path(tag_dir: Path, dp_rank: int, mp: int) -> Path:
    return tag_dir / f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"


def checkpoint_layout(tag_dir: str | Path) -> dict:
    """{tp, pp, dp, zero_stage} of the run that wrote a DeepSpeed tag, from its files (DeepSpeed records
    them in every model-states file; without those fields: counted from the file names)."""
    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or \
        sorted(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    states = _load_ds(files[0])
    dims = states.get("checkpoint_parallel_dimensions") or {}
    mp = int(states.get("mp_world_size") or len(files))
    tp_ranks = {int(m.group(2)) for p in tag_dir.glob("layer_*-model_states.pt") if (m := _LAYER_FILE.search(p.name))}
    tp = int(dims.get("tp_degree") or (len(tp_ranks) if tp_ranks else mp))
    pp = int(dims.get("pp_degree") or max(1, mp // tp))
    dp = int(states.get("dp_world_size") or len(list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or 1)
    zero = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    return {"tp": tp, "pp": pp, "dp": dp, "zero_stage": zero}


def _torch_optimizer_names(cfg: ModelConfig, pp: int, stage: int, group_sizes: list[int],
                           saved: list[list[str]] | None = None) -> list[str] | None:
    """Names of a torch optimizer's parameter indices. Checkpoints save them (optimizer_param_names); for tags
    written before that, rebuild them: pretrain.optim.param_groups puts the trainable matrices first, then the
    vectors, each in module order. Trainable: everything, or the module only (recycle.detach_base); whichever
    matches the saved group sizes. None if neither does."""
    if saved is not None and [len(g) for g in saved] == group_sizes and all(n for g in saved for n in g):
        return [n for g in saved for n in g]
    shapes = meta_shapes(cfg)
    names = stage_parameter_names(cfg, pp, stage)
    for trainable in (lambda n: True, lambda n: n.startswith("recycle.")):
        chosen = [n for n in names if trainable(n)]
        decay = [n for n in chosen if len(shapes[n]) >= 2]
        no_decay = [n for n in chosen if len(shapes[n]) < 2]
        if len(group_sizes) == 2 and [len(decay), len(no_decay)] == group_sizes:
            return decay + no_decay
        if len(group_sizes) == 1 and group_sizes[0] == len(chosen):
            return chosen
    return None


def _read_torch_optimizer(opt_sd: dict, cfg, pp, stage, keep, saved_names=None):
    """ZeRO 0: fp32 masters (FP16_UnfusedOptimizer only, else {}) and moments from a torch optimizer dict."""
    masters = opt_sd.get("fp32_groups") if "optimizer_state_dict" in opt_sd else None
    base = opt_sd["optimizer_state_dict"] if masters is not None else opt_sd
    if "param_groups" not in base or "state" not in base:
        return None
    indices = [i for g in base["param_groups"] for i in g["params"]]
    names = _torch_optimizer_names(cfg, pp, stage, [len(g["params"]) for g in base["param_groups"]], saved_names)
    if names is None:
        return None
    w, m1, m2, step = {}, {}, {}, None
    flat_masters = [t for g in masters for t in g] if masters is not None else None
    for pos, (idx, name) in enumerate(zip(indices, names)):
        if not keep(name):
            continue
        if flat_masters is not None:
            w[name] = flat_masters[pos]
        st = base["state"].get(idx)
        if not st or "exp_avg" not in st:
            return w, None, None, None            # no step taken yet (or not Adam): weights only
        m1[name], m2[name] = st["exp_avg"], st["exp_avg_sq"]
        step = float(st["step"])
    return w, m1, m2, step


def _read_zero12(tag_dir: Path, mp: int, dp: int, prefixes, keep):
    """ZeRO 1/2 or BF16_Optimizer: every dp rank's fragment of each parameter, concatenated in rank order."""
    states = _load_ds(_model_states_path(tag_dir, mp))
    shapes = {full_name(k, prefixes): v for g in states["param_shapes"] for k, v in g.items()}
    pieces: dict[str, list] = {}
    step, have_moments = None, True
    for d in range(dp):
        sd = _load_ds(_optim_path(tag_dir, d, mp))["optimizer_state_dict"]
        base_state = sd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            tensors = [sd["single_partition_of_fp32_groups"][g]]
            st = base_state.get(g) or {}
            if "exp_avg" in st:
                tensors += [st["exp_avg"], st["exp_avg_sq"]]
                step = float(st["step"])
            else:
                have_moments = False
            for local, frag in mapping.items():
                name = full_name(local, prefixes)
                if keep(name):
                    pieces.setdefault(name, []).append([t.narrow(0, frag.start, frag.numel) for t in tensors])
    out = ({}, {}, {})
    for name, parts in pieces.items():
        for i in range(3 if have_moments else 1):
            out[i][name] = lambda ts=[p[i] for p in parts], shape=shapes[name]: torch.cat(ts).view(shape)
    return out[0], (out[1] if have_moments else None), (out[2] if have_moments else None), step


def _read_zero3(tag_dir: Path, mp: int, dp: int, keep):
    """ZeRO 3: each parameter is ceil(numel/dp) elements on every dp rank (the last padded), consecutive in
    the rank's flat groups in param_shapes order (DeepSpeed's zero_to_fp32 protocol); frozen parameters
    are fragments in the model states."""
    model_states = [_load_ds(tag_dir / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_model_states.pt") for d in range(dp)]
    shapes = {k.removeprefix("module."): v for g in model_states[0]["param_shapes"] for k, v in g.items()}
    flats, m1s, m2s, step = [], [], [], None
    for d in range(dp):
        sd = _load_ds(_optim_path(tag_dir, d, mp))["optimizer_state_dict"]
        groups = list(sd["fp32_flat_groups"])
        state = [sd["optimizer_state_dict"]["state"].get(g) or {} for g in range(len(groups))]
        flats.append(groups)
        if all("exp_avg" in st for st in state):
            m1s.append([st["exp_avg"] for st in state])
            m2s.append([st["exp_avg_sq"] for st in state])
            step = float(state[0]["step"])
    have_moments = len(m1s) == dp
    starts = [0]
    for t in flats[0]:
        starts.append(starts[-1] + t.numel())

    def span(groups, offset, n):              # elements [offset, offset+n) of a rank's groups, end to end
        out = []
        for g, t in enumerate(groups):
            lo, hi = max(offset, starts[g]), min(offset + n, starts[g + 1])
            if lo < hi:
                out.append(t.narrow(0, lo - starts[g], hi - lo))
        return out

    w, m1, m2 = {}, {}, {}
    offset = 0
    for name, shape in shapes.items():
        numel, part = shape.numel(), -(-shape.numel() // dp)
        if keep(name):
            for target, per_rank in ((w, flats), (m1, m1s), (m2, m2s)):
                if per_rank:
                    pieces = [piece for groups in per_rank for piece in span(groups, offset, part)]
                    target[name] = lambda ps=pieces, n=numel, s=shape: torch.cat(ps).narrow(0, 0, n).view(s)
        offset += part
    if offset != starts[-1]:
        raise ValueError(f"{tag_dir}: ZeRO-3 partitions hold {starts[-1]} elements per rank, the parameter "
                         f"shapes need {offset}; is the checkpoint from another model?")
    for name, shape in (model_states[0].get("frozen_param_shapes") or {}).items():
        local = name
        name = name.removeprefix("module.")
        if keep(name):
            frags = [ms["frozen_param_fragments"][local] for ms in model_states]
            w[name] = lambda fs=frags, s=shape: torch.cat(fs).narrow(0, 0, s.numel()).view(s)
    return w, (m1 if have_moments else None), (m2 if have_moments else None), step


def _module_weights(tag_dir: Path, cfg: ModelConfig, tp: int, pp: int, keep) -> list[dict]:
    """Per saved TP rank {name: tensor} of the module weights DeepSpeed wrote besides the optimizer
    (pp == 1: the model-states files' "module"; pp > 1: the layer files)."""
    per_tp = [dict() for _ in range(tp)]
    if pp == 1:
        for t in range(tp):
            for k, v in _load_ds(_model_states_path(tag_dir, t))["module"].items():
                if keep(k.removeprefix("module.")):
                    per_tp[t][k.removeprefix("module.")] = v
        return per_tp
    prefixes = layer_prefixes(cfg)
    for path in sorted(tag_dir.glob("layer_*-model_states.pt")):
        m = _LAYER_FILE.search(path.name)
        layer, t = int(m.group(1)), int(m.group(2))
        if layer < len(prefixes) and prefixes[layer] is not None and _file_may_hold(cfg, prefixes, layer, keep):
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            per_tp[t].update({prefixes[layer] + k: v for k, v in sd.items() if keep(prefixes[layer] + k)})
    return per_tp


def training_state(tag_dir: str | Path, cfg: ModelConfig, keep=None, tp_rank: int | None = None,
                   tp_size: int | None = None) -> TrainingState:
    """Weights and Adam moments of a DeepSpeed tag written under any (tp, pp, dp, ZeRO) layout.

    keep: the one-device names to read (a rank needs only its own parameters); None: all of them.
    tp_rank/tp_size: return that TP shard of each tensor (what a rank of the *new* layout holds); the full
    tensor of one parameter exists only while it is being cut. Moments are None when the checkpoint's
    optimizer state is not one of the shapes above (or no step was taken)."""
    tag_dir = Path(tag_dir)
    layout = checkpoint_layout(tag_dir)
    tp, pp, dp, zero = layout["tp"], layout["pp"], layout["dp"], layout["zero_stage"]
    want = (lambda n: True) if keep is None else (lambda n: n in keep)
    prefixes = layer_prefixes(cfg) if pp > 1 else None

    module = _module_weights(tag_dir, cfg, tp, pp, want) if zero != 3 else [dict() for _ in range(tp)]
    masters = [dict() for _ in range(tp)]
    m1, m2 = [dict() for _ in range(tp)], [dict() for _ in range(tp)]
    step, moments = None, True
    for stage in range(pp):
        for t in range(tp):
            mp = stage * tp + t
            if zero == 3:
                got = _read_zero3(tag_dir, mp, dp, want)
            elif _optim_path(tag_dir, 0, mp).is_file():
                got = _read_zero12(tag_dir, mp, dp, prefixes, want)
            else:
                states = _load_ds(_model_states_path(tag_dir, mp))
                opt_sd = states.get("optimizer")
                got = _read_torch_optimizer(opt_sd, cfg, pp, stage, want, states.get(OPTIMIZER_NAMES_KEY)) \
                    if isinstance(opt_sd, dict) else None
            if got is None:
                moments = False
                continue
            w, a, b, s = got
            masters[t].update(w)
            if a is None:
                moments = False
            else:
                m1[t].update(a)
                m2[t].update(b)
                step = s if step is None else max(step, s)
    moments = moments and step is not None

    layout_of = tp_layout(cfg)
    shard = tp_size is not None and tp_rank is not None

    def assemble(per_tp: list[dict], name: str) -> torch.Tensor:
        split = layout_of.get(name)
        parts = [per_tp[t][name] for t in (range(tp) if split is not None else [0])]
        parts = [p() if callable(p) else p for p in parts]
        full = (unshard_tensor(parts, *split) if split is not None and tp > 1 else parts[0]).float()
        if shard and split is not None and tp_size > 1:
            return shard_tensor(full, *split, tp_rank, tp_size)
        return full

    have = lambda per_tp, name: all(name in sd for sd in per_tp)
    names = sorted(set().union(*masters, *module)) if keep is None else sorted(keep)
    missing = [n for n in names if not have(masters, n) and not have(module, n)]
    if missing:
        raise ValueError(f"{tag_dir} lacks {len(missing)} parameter(s) of this model, e.g. {missing[:3]}; "
                         "is it from another model config?")
    # fp32 masters where the optimizer keeps them (bf16 runs: the module's copy is rounded), else the module's.
    weights = {n: assemble(masters if have(masters, n) else module, n) for n in names}
    result = TrainingState(weights, tp_shard=(tp_rank, tp_size) if shard else None)
    if moments:
        trained = [n for n in names if have(m1, n)]
        result.exp_avg = {n: assemble(m1, n) for n in trained}
        result.exp_avg_sq = {n: assemble(m2, n) for n in trained}
        result.step = step
        for n in trained:
            if result.exp_avg[n].shape != weights[n].shape:
                raise ValueError(f"{tag_dir}: moments of {n} have shape {tuple(result.exp_avg[n].shape)}, the "
                                 f"weight {tuple(weights[n].shape)}")
    return result
