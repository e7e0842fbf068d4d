"""Between layouts: one-device ("full") state dicts <-> this rank's TP/PP parameters and checkpoint files.

Every function speaks the one-device model's key names (`RecycleGPT.state_dict()`), so a checkpoint
written under any (tp, pp) layout can be read back as one state dict, and one state dict can be loaded
into any layout. The split rules are `parallel.tensor_parallel.tp_layout`; the pipeline's layer index ->
name prefix map is `parallel.pipeline.layer_prefixes`.

Training checkpoints (resuming under another tp/pp/dp/ZeRO layout, pretrain.relayout):
`checkpoint_layout(tag_dir)`, `training_state(tag_dir, cfg, keep, tp_rank, tp_size)` (fp32 weights and Adam
moments from any layout's files) and `load_training_state(engine, state, cfg, tp_rank, tp_size)` (into a
built engine of any layout, ZeRO partitions and fp32 masters included).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from parallel.tensor_parallel import shard_state_dict, shard_tensor, tp_layout, unshard_state_dicts, \
    unshard_tensor

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


def full_named_parameters(module: nn.Module):
    """(one-device name, parameter) of this rank: RecycleGPT as is, a RecyclePipe through its prefixes."""
    if hasattr(module, "full_named_parameters"):
        return list(module.full_named_parameters())
    return list(module.named_parameters())


def expected_keys(cfg: ModelConfig) -> set[str]:
    from model.gpt import RecycleGPT
    with torch.device("meta"):
        return set(RecycleGPT(cfg).state_dict().keys())


@torch.no_grad()
def load_full_state(module: nn.Module, full_sd: dict, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1):
    """Copy a one-device state dict into this rank's parameters (TP shard, PP stage). Before
    deepspeed.initialize: under ZeRO-3 parameters are partitioned afterwards."""
    params = dict(full_named_parameters(module))
    missing = sorted(set(params) - set(full_sd))
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} parameter(s) this rank needs, e.g. {missing[:3]}")
    shard = shard_state_dict({k: full_sd[k] for k in params}, cfg, tp_rank, tp_size)
    for name, p in params.items():
        if p.shape != shard[name].shape:
            raise ValueError(f"{name}: rank holds {tuple(p.shape)}, state dict gives {tuple(shard[name].shape)} "
                             f"for TP rank {tp_rank}/{tp_size}; is it from a model with another config?")
        p.copy_(shard[name])


def local_state(module: nn.Module) -> dict:
    """This rank's parameters under one-device names (TP shards as they are), detached, on CPU."""
    return {k: p.detach().cpu().clone() for k, p in full_named_parameters(module)}


def pipeline_state_dict(tag_dir: str | Path, cfg: ModelConfig) -> dict:
    """The full fp32 state dict from a DeepSpeed pipeline checkpoint tag (`layer_XX-model_YY-model_states.pt`:
    XX the pipeline layer, YY the TP rank)."""
    from parallel.pipeline import layer_prefixes

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


def _meta_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    from model.gpt import RecycleGPT
    with torch.device("meta"):
        return {k: p.shape for k, p in RecycleGPT(cfg).named_parameters()}


def stage_parameter_names(cfg: ModelConfig, pp: int, stage: int) -> list[str]:
    """One-device names of the parameters a pipeline stage's module holds, in its `parameters()` order (the
    tied embedding first: DeepSpeed registers `tied_modules` before the layers). pp == 1: the whole model."""
    from parallel.pipeline import layer_prefixes, stage_layer_counts

    names = list(_meta_shapes(cfg))
    if pp == 1:
        return names
    prefixes = layer_prefixes(cfg)
    bounds = [0]
    for c in stage_layer_counts(cfg, pp):
        bounds.append(bounds[-1] + c)
    parts = [0] + [1 + b for b in bounds[1:-1]] + [len(prefixes)]      # as RecyclePipe._parts
    tied, own = [], []
    for idx in range(parts[stage], parts[stage + 1]):
        if idx == 0 or prefixes[idx] is None:
            tied = ["embedding.weight"]
        elif idx == len(prefixes) - 1:                                  # HeadPipe: LM head + module
            own += [n for n in names if n.startswith(("lm_head.", "recycle."))]
        else:
            own += [n for n in names if n.startswith(prefixes[idx])]
    return tied + own


def _full_name(local: str, prefixes) -> str:
    """A checkpoint's parameter name (module, or pipeline stage with its layer index) -> one-device name."""
    local = local.removeprefix("module.")
    head, _, rest = local.partition(".")
    if prefixes is not None and head == "tied_modules":
        return rest.partition(".")[2]                    # tied_modules.embed.embedding.weight
    if prefixes is not None and head.isdigit():
        return prefixes[int(head)] + rest
    return local


OPTIMIZER_NAMES_KEY = "optimizer_param_names"   # client state of each model-parallel rank's model_states file


def optimizer_param_names(engine) -> list[list[str]]:
    """One-device names of the torch optimizer's parameters, group by group, on this rank: saved with every
    checkpoint (under OPTIMIZER_NAMES_KEY) so a reader maps optimizer indices to parameters without guessing."""
    optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
    names = {id(p): n for n, p in full_named_parameters(engine.module)}
    return [[names.get(id(p), "") for p in group["params"]] for group in optimizer.param_groups]


def _torch_optimizer_names(cfg: ModelConfig, pp: int, stage: int, group_sizes: list[int],
                           saved: list[list[str]] | None = None) -> list[str] | None:
    """Names of a torch optimizer's parameter indices. Checkpoints save them (optimizer_param_names); for tags
    written before that, rebuild them: pretrain.optim.param_groups puts the trainable matrices first, then the
    vectors, each in module order. Trainable: everything, or the module only (recycle.detach_base); whichever
    matches the saved group sizes. None if neither does."""
    if saved is not None and [len(g) for g in saved] == group_sizes and all(n for g in saved for n in g):
        return [n for g in saved for n in g]
    shapes = _meta_shapes(cfg)
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


# The readers return ({name: tensor or zero-argument function making it}, same for exp_avg, exp_avg_sq, step)
# for one model-parallel rank; moments None when that rank has none. Functions keep the concatenation of
# partitions for later, so only one parameter is ever materialised in full.

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
    shapes = {_full_name(k, prefixes): v for g in states["param_shapes"] for k, v in g.items()}
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
                name = _full_name(local, prefixes)
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
    from parallel.pipeline import layer_prefixes
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
    from parallel.pipeline import layer_prefixes
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


def _adam_state(torch_opt, p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float) -> dict:
    """What torch's Adam/AdamW `_init_group` would have created for `p`, filled in (a step tensor per
    parameter: the optimizer increments it in place)."""
    # ZeRO 3 puts its flat partitions into the param groups only around step(); the groups agree on these flags.
    group = next((g for g in torch_opt.param_groups if any(q is p for q in g["params"])), torch_opt.param_groups[0])
    on_device = bool(group.get("fused") or group.get("capturable"))
    return {"step": torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu"),
            "exp_avg": exp_avg.to(device=p.device, dtype=p.dtype).reshape(p.shape).clone(),
            "exp_avg_sq": exp_avg_sq.to(device=p.device, dtype=p.dtype).reshape(p.shape).clone()}


@torch.no_grad()
def load_training_state(engine, state: TrainingState, cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1) -> bool:
    """Put a one-device TrainingState into a built DeepSpeed engine of any layout, before its first step: this
    rank's TP shard of every parameter it holds (its pipeline stage) into the module, the fp32 master
    copies the optimizer keeps (ZeRO 1/2/3 partitions, BF16/FP16-unfused masters) and, when the state has
    them, Adam's moments and step count into the optimizer state. Returns whether the moments were loaded
    (else the optimizer state stays empty: Adam starts its moments and bias correction afresh)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = full_named_parameters(engine.module)
    trainable = [(n, p) for n, p in params if p.requires_grad]
    moments = state.has_moments and all(n in state.exp_avg for n, _ in trainable)

    def local(d: dict, name: str, p) -> torch.Tensor:
        value = d[name] if state.tp_shard == (tp_rank, tp_size) else \
            shard_state_dict({name: d[name]}, cfg, tp_rank, tp_size)[name]
        want = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(value.shape) != want:
            raise ValueError(f"{name}: this rank holds {want}, the checkpoint gives {tuple(value.shape)} for TP rank "
                             f"{tp_rank}/{tp_size}; is it from a model with another config?")
        return value

    zero3 = any(hasattr(p, "ds_id") for _, p in params)
    for name, p in params:                                       # the module's (low-precision) weights
        value = local(state.weights, name, p)
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))

    opt = engine.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition", None)
    if flats is not None:                                        # ZeRO 1/2, BF16_Optimizer: lp -> hp fragments
        if moments:
            for flat in flats:
                opt.optimizer.state[flat] = _adam_state(opt.optimizer, flat, torch.zeros_like(flat),
                                                        torch.zeros_like(flat), state.step)
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()          # fragments of this rank's params -> the new state
        for name, p in trainable:
            safe_set_full_fp32_param(p, local(state.weights, name, p).to(p.device))
            if moments:
                safe_set_full_optimizer_state(p, local(state.exp_avg, name, p).to(p.device), "exp_avg")
                safe_set_full_optimizer_state(p, local(state.exp_avg_sq, name, p).to(p.device), "exp_avg_sq")
    elif hasattr(opt, "fp32_partitioned_groups_flat"):           # ZeRO 3: each parameter split evenly over dp
        if moments:
            for flat in opt.fp32_partitioned_groups_flat:
                opt.optimizer.state[flat] = _adam_state(opt.optimizer, flat, torch.zeros_like(flat),
                                                        torch.zeros_like(flat), state.step)
        sources = [(None, state.weights)] + ([("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq)]
                                             if moments else [])
        for name, p in trainable:
            rank = opt._get_param_partition_rank(p)
            for key, source in sources:
                part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
                n = part.numel()
                flat = local(source, name, p).flatten()
                flat = torch.nn.functional.pad(flat, (0, max(0, (rank + 1) * n - flat.numel())))
                part.copy_(flat.narrow(0, rank * n, n).to(part.device, part.dtype))
    elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):   # FP16_UnfusedOptimizer (bf16, ZeRO 0)
        master_of = {id(lp): m for lows, masters in zip(opt.fp16_groups, opt.fp32_groups) for lp, m in zip(lows, masters)}
        for name, p in trainable:
            master = master_of[id(p)]
            master.copy_(local(state.weights, name, p).to(master.device))
            if moments:
                opt.optimizer.state[master] = _adam_state(opt.optimizer, master, local(state.exp_avg, name, p),
                                                          local(state.exp_avg_sq, name, p), state.step)
    elif isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):    # plain fp32 (ZeRO 0)
        if moments:
            for name, p in trainable:
                opt.state[p] = _adam_state(opt, p, local(state.exp_avg, name, p), local(state.exp_avg_sq, name, p),
                                           state.step)
    else:
        raise NotImplementedError(f"loading a resharded checkpoint into DeepSpeed's {type(opt).__name__} is not "
                                  "supported; resume with the layout the checkpoint was written with")
    return moments
