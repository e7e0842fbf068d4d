"""Names and split rules of every layout, in one place: which parameters tensor parallelism splits and along
which dim (`tp_layout`, `shard_*`/`unshard_*`), how a pipeline cuts the model into stages (`layer_prefixes`,
`stage_layer_counts`, `stage_parts`) and how a rank's or a checkpoint's parameter names map to the one-device
model's names (`full_name`, `stage_parameter_names`). Pure functions of the model config: no process group,
no DeepSpeed, no megatron-core.

    full state dict  --shard_state_dict-->  rank's state dict  --unshard_state_dicts-->  full state dict

Fused parameters are split per block: a rank holds [Q_r; K_r; V_r] of linear_qkv and [gate_r; up_r] of
linear_fc1.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.gpt import RecycleGPT

# ------------------------------------------------------------------------------ tensor parallel


def tp_layout(cfg: ModelConfig) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """{parameter name: (split dim, fused block sizes or None)} for every TP-split parameter of the full
    model (our key names). Every other parameter (norms, recycle.linear_in) is replicated across TP ranks."""
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    layout = {"embedding.weight": (0, None), "lm_head.weight": (0, None)}
    stacks = [f"layers.{i}." for i in range(cfg.num_layers)]
    stacks += [f"recycle.layers.{j}." for j in range(cfg.recycle_layers)]
    for prefix in stacks:
        layout[prefix + "self_attention.linear_qkv.weight"] = (0, (q, kv, kv))
        layout[prefix + "self_attention.linear_proj.weight"] = (1, None)
        layout[prefix + "mlp.linear_fc1.weight"] = (0, (f, f))
        layout[prefix + "mlp.linear_fc2.weight"] = (1, None)
    return layout


def shard_tensor(full: torch.Tensor, dim: int, fused, tp_rank: int, tp_size: int) -> torch.Tensor:
    blocks = full.split(list(fused), dim) if fused else [full]
    for b in blocks:
        if b.shape[dim] % tp_size:
            raise ValueError(f"cannot split a block of {b.shape[dim]} along dim {dim} into {tp_size} TP shards")
    return torch.cat([b.chunk(tp_size, dim)[tp_rank] for b in blocks], dim).clone()


def unshard_tensor(shards: list[torch.Tensor], dim: int, fused) -> torch.Tensor:
    if not fused:
        return torch.cat(shards, dim)
    n = len(shards)
    per_rank = [s // n for s in fused]
    pieces = [s.split(per_rank, dim) for s in shards]          # pieces[rank][block]
    return torch.cat([torch.cat([p[b] for p in pieces], dim) for b in range(len(fused))], dim)


def shard_state_dict(full_sd: dict, cfg: ModelConfig, tp_rank: int, tp_size: int) -> dict:
    """The state dict of TP rank `tp_rank` of `tp_size`, from a full (one-device) state dict."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside tp_size={tp_size}")
    layout = tp_layout(cfg)
    out = {}
    for name, value in full_sd.items():
        split = layout.get(name)
        out[name] = value if split is None or tp_size == 1 else shard_tensor(value, *split, tp_rank, tp_size)
    return out


def unshard_state_dicts(sds: list[dict], cfg: ModelConfig) -> dict:
    """The full state dict from the state dicts of TP ranks 0..n-1 (replicated tensors taken from rank 0)."""
    if not sds:
        raise ValueError("unshard_state_dicts needs the state dicts of all TP ranks, got none")
    keys = sds[0].keys()
    for r, sd in enumerate(sds[1:], 1):
        if sd.keys() != keys:
            diff = sorted(set(sd) ^ set(keys))[:3]
            raise ValueError(f"TP rank {r}'s state dict has different keys than rank 0's (e.g. {diff})")
    layout = tp_layout(cfg)
    out = {}
    for name in keys:
        split = layout.get(name)
        out[name] = sds[0][name] if split is None or len(sds) == 1 else unshard_tensor([sd[name] for sd in sds], *split)
    return out


# ------------------------------------------------------------------------------ pipeline stages


def layer_prefixes(cfg: ModelConfig) -> list[str | None]:
    """Per pipeline layer index, the prefix that turns its local parameter names into the one-device
    model's names (None: a tied use whose weights belong to layer 0). Also the checkpoint layer files."""
    prefixes = [""] + [f"layers.{i}." for i in range(cfg.num_layers)] + ["final_norm."]
    if cfg.recycle_layers:
        prefixes.append(None)
    return prefixes + [""]


def stage_layer_counts(cfg: ModelConfig, pp: int) -> list[int]:
    """Decoder layers per stage, minimising the busiest stage. A decoder layer costs 1; the last stage also
    carries the module's layers and two LM-head products (next token and token after next)."""
    L = cfg.num_layers
    if not 1 <= pp <= L:
        raise ValueError(f"parallel.pp={pp} must be between 1 and model.num_layers={L}")
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    layer_params = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * d \
        + 3 * d * f
    head = cfg.recycle_layers + (2 if cfg.recycle_layers else 1) * cfg.vocab_size * d / layer_params
    # best[s][n]: (max load, counts) for the first n layers on s stages; the last stage adds `head`.
    best = {(0, 0): (0.0, [])}
    for s in range(1, pp + 1):
        for n in range(s, L - (pp - s) + 1):
            candidates = []
            for k in range(s - 1, n):
                if (s - 1, k) in best:
                    load = (n - k) + (head if s == pp else 0.0)
                    prev, counts = best[(s - 1, k)]
                    candidates.append((max(prev, load), counts + [n - k]))
            best[(s, n)] = min(candidates, key=lambda c: (c[0], [-x for x in c[1]]))
    return best[(pp, L)][1]


def stage_parts(cfg: ModelConfig, pp: int) -> list[int]:
    """Pipeline layer index bounds of each stage: stage s holds layers parts[s] .. parts[s+1]-1 of
    `layer_prefixes(cfg)` (the embedding with stage 0, the head and the module with the last stage)."""
    bounds = [0]
    for c in stage_layer_counts(cfg, pp):
        bounds.append(bounds[-1] + c)
    return [0] + [1 + b for b in bounds[1:-1]] + [len(layer_prefixes(cfg))]


def full_name(local: str, prefixes) -> str:
    """A rank's parameter name (RecycleGPT, or a pipeline stage's `<layer index>.<rest>` / `tied_modules.*`,
    optionally under DeepSpeed's `module.`) -> the one-device model's name. prefixes: `layer_prefixes(cfg)`
    for a pipeline, None for a plain model."""
    local = local.removeprefix("module.")
    head, _, rest = local.partition(".")
    if prefixes is not None and head == "tied_modules":
        return rest.partition(".")[2]                    # tied_modules.embed.embedding.weight
    if prefixes is not None and head.isdigit():
        return prefixes[int(head)] + rest
    return local


def meta_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: p.shape for k, p in RecycleGPT(cfg).named_parameters()}


def expected_keys(cfg: ModelConfig) -> set[str]:
    return set(meta_shapes(cfg))


def stage_parameter_names(cfg: ModelConfig, pp: int, stage: int) -> list[str]:
    """One-device names of the parameters a pipeline stage's module holds, in its `parameters()` order (the
    tied embedding first: DeepSpeed registers `tied_modules` before the layers). pp == 1: the whole model."""
    names = list(meta_shapes(cfg))
    if pp == 1:
        return names
    prefixes = layer_prefixes(cfg)
    parts = stage_parts(cfg, pp)
    tied, own = [], []
    for idx in range(parts[stage], parts[stage + 1]):
        if idx == 0 or prefixes[idx] is None:
            tied = ["embedding.weight"]
        elif idx == len(prefixes) - 1:                                  # HeadPipe: LM head + module
            own += [n for n in names if n.startswith(("lm_head.", "recycle."))]
        else:
            own += [n for n in names if n.startswith(prefixes[idx])]
    return tied + own
