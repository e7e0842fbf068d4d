"""parallel/ on one process, no process group: dims validation, launcher env, DeepSpeed config, TP shard
maps and the seeded streaming init, pipeline partitioning. The multi-process runs are in
test_parallel_dist.py."""
import json

import pytest
import torch

from model import ModelConfig, RecycleGPT
from parallel.deepspeed_config import deepspeed_config
from parallel.dims import ParallelDims
from parallel.layout import layer_prefixes, stage_layer_counts
from parallel.setup import _first_host, launcher_env
from parallel.tensor_parallel import (init_state_dict, shard_state_dict, shard_tensor, tp_layout, unshard_state_dicts,
                                      unshard_tensor)

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                  max_seq_len=32, recycle_layers=2)
MHA = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_hidden_size=128,
                  max_seq_len=32, recycle_layers=1)


# ------------------------------------------------------------------------------------------- dims
def test_dims_derive_dp_and_layout():
    d = ParallelDims(tp=2, pp=2, world_size=8)
    assert d.dp == 2 and str(d) == "world 8 = tp 2 x pp 2 x dp 2"
    assert d.coords(5) == (1, 0, 1) and d.rank(1, 0, 1) == 5
    assert [0, 1] in d.groups("tp") and [0, 2] in d.groups("dp") and [0, 4] in d.groups("pp")
    assert all(d.coords(d.rank(*d.coords(r))) == d.coords(r) for r in range(8))


@pytest.mark.parametrize("kwargs, cfg, needle", [
    (dict(tp=3, world_size=6), ModelConfig(), "parallel.tp=3 does not divide model.num_heads=4; valid tp: 1, 2"),
    (dict(tp=4, world_size=4), ModelConfig(), "parallel.tp=4 does not divide model.num_kv_heads=2; valid tp: 1, 2"),
    (dict(tp=2, world_size=2), ModelConfig(ffn_hidden_size=705, vocab_size=8192),
     "does not divide model.ffn_hidden_size=705"),
    (dict(tp=2, world_size=2), ModelConfig(vocab_size=8191), "does not divide model.vocab_size=8191"),
    (dict(pp=8, world_size=8), ModelConfig(), "parallel.pp=8 exceeds model.num_layers=4"),
])
def test_dims_model_errors_name_the_values(kwargs, cfg, needle):
    with pytest.raises(ValueError, match="valid") as e:
        ParallelDims(**kwargs).validate_model(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_dims_world_errors():
    with pytest.raises(ValueError, match=r"parallel.tp=2 x parallel.pp=2 = 4 does not divide the world size 6"):
        ParallelDims(tp=2, pp=2, world_size=6)
    with pytest.raises(ValueError, match=r"use dp=2 or launch 12 processes"):
        ParallelDims(tp=2, pp=2, dp=3, world_size=8)
    with pytest.raises(ValueError, match=r"parallel.tp=0 must be an integer >= 1"):
        ParallelDims(tp=0)


def test_grad_accumulation():
    d = ParallelDims(tp=2, world_size=4)              # dp = 2
    assert d.grad_accumulation(16, 2) == 4
    with pytest.raises(ValueError, match=r"train.global_batch_size=10 is not a multiple of "
                                         r"train.micro_batch_size=2 x dp=2 = 4; valid: 8 or 12"):
        d.grad_accumulation(10, 2)


def test_from_config_reads_sections_and_launcher(monkeypatch):
    class Section:
        tp, pp, zero_stage = 2, 1, 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ParallelDims.from_config(CFG, Section()).dp == 2
    assert ParallelDims.from_config(CFG, {"tp": 1, "pp": 2}).dp == 2
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert ParallelDims.from_config(CFG, tp=2).world_size == 2
    with pytest.raises(ValueError, match="model.num_kv_heads=2"):
        ParallelDims.from_config(CFG, tp=4, world_size=4)


# ---------------------------------------------------------------------------------- launcher env
def test_launcher_env_without_launcher():
    env = launcher_env({})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_launcher_env_keeps_torchrun_values():
    given = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launcher_env(given) == {}


def test_launcher_env_maps_srun_and_mpirun():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[003-005,9],cpu1", "SLURM_JOB_ID": "123456"}
    env = launcher_env(slurm)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "gpu003")
    assert env["MASTER_PORT"] == str(15000 + 123456 % 20000)   # the same on every task, no talking needed
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert launcher_env(ompi) == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    with pytest.raises(ValueError, match="MASTER_PORT is not set"):
        launcher_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert _first_host("node7") == "node7" and _first_host("a[1-2]") == "a1"


# ------------------------------------------------------------------------------ DeepSpeed config
def test_deepspeed_config_derived_and_merged(tmp_path):
    dims = ParallelDims(tp=1, pp=1, world_size=2)
    ds = deepspeed_config(dims, micro_batch=2, global_batch=8, grad_clip=0.5, zero_stage=2, precision="fp32")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "steps_per_print": 5}))
    merged = deepspeed_config(dims, micro_batch=2, global_batch=8, zero_stage=2, precision="fp32", user_config=user)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": False} and merged["steps_per_print"] == 5
    opt = deepspeed_config(dims, micro_batch=2, global_batch=8, precision="fp32",
                           optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    if not torch.cuda.is_available():
        assert opt["optimizer"]["params"]["torch_adam"] is True


def test_deepspeed_config_errors(tmp_path):
    pipe = ParallelDims(pp=2, world_size=2)
    with pytest.raises(ValueError, match=r"parallel.zero_stage=2 with parallel.pp=2: .*zero_stage=1"):
        deepspeed_config(pipe, micro_batch=1, global_batch=4, zero_stage=2, precision="fp32")
    dims = ParallelDims(world_size=2)
    with pytest.raises(ValueError, match=r"train_batch_size=8 != .*x dp=2"):
        deepspeed_config(dims, micro_batch=2, global_batch=8, precision="fp32",
                         user_config={"gradient_accumulation_steps": 4})
    with pytest.raises(ValueError, match="does not exist"):
        deepspeed_config(dims, micro_batch=2, global_batch=8, precision="fp32", user_config=tmp_path / "nope.json")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.precision=bf16 needs a GPU"):
            deepspeed_config(dims, micro_batch=2, global_batch=8, precision="bf16")


# ------------------------------------------------------------------------------------- TP shards
def _random_state(cfg):
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in RecycleGPT(cfg).state_dict().items()}


@pytest.mark.parametrize("cfg, tp", [(CFG, 2), (MHA, 2), (MHA, 4)])
def test_shard_unshard_round_trip(cfg, tp):
    full = _random_state(cfg)
    shards = [shard_state_dict(full, cfg, r, tp) for r in range(tp)]
    back = unshard_state_dicts(shards, cfg)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    # TP=tp -> TP=1 -> TP=2 goes through the same maps
    again = [shard_state_dict(back, cfg, r, 2) for r in range(2)]
    assert all(torch.equal(unshard_state_dicts(again, cfg)[k], full[k]) for k in full)


def test_shard_layout_is_per_block():
    cfg, tp = CFG, 2
    full = _random_state(cfg)
    q, kv, f, v = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    r = 1
    sd = shard_state_dict(full, cfg, r, tp)
    qkv = full["layers.0.self_attention.linear_qkv.weight"]
    Q, K, V = qkv.split([q, kv, kv])
    want = torch.cat([Q.chunk(tp)[r], K.chunk(tp)[r], V.chunk(tp)[r]])    # [Q_r; K_r; V_r]
    assert torch.equal(sd["layers.0.self_attention.linear_qkv.weight"], want)
    gate, up = full["recycle.layers.1.mlp.linear_fc1.weight"].split([f, f])
    assert torch.equal(sd["recycle.layers.1.mlp.linear_fc1.weight"], torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    assert torch.equal(sd["layers.2.mlp.linear_fc2.weight"], full["layers.2.mlp.linear_fc2.weight"].chunk(tp, 1)[r])
    assert torch.equal(sd["embedding.weight"], full["embedding.weight"][v // 2:])
    assert torch.equal(sd["lm_head.weight"], full["lm_head.weight"][v // 2:])
    for name in ("recycle.linear_in.weight", "final_norm.weight", "recycle.embed_norm.weight"):
        assert name not in tp_layout(cfg) and sd[name] is full[name]
    with pytest.raises(ValueError, match="cannot split a block of 3"):
        shard_tensor(torch.zeros(3, 4), 0, None, 0, 2)
    assert torch.equal(unshard_tensor([want[:, :2], want[:, 2:]], 1, None), want)


@pytest.mark.parametrize("cfg", [CFG, ModelConfig(recycle_layers=0, num_layers=2, vocab_size=1024)])
def test_streaming_init_equals_seeded_model(cfg):
    torch.manual_seed(11)
    ref = RecycleGPT(cfg).state_dict()
    before = torch.random.get_rng_state()
    streamed = dict(init_state_dict(cfg, 11))
    assert torch.equal(before, torch.random.get_rng_state())            # global RNG untouched
    assert streamed.keys() == ref.keys() and all(torch.equal(streamed[k], ref[k]) for k in ref)
    if cfg.vocab_size % 2 == 0:
        shards = [dict(init_state_dict(cfg, 11, r, 2)) for r in range(2)]
        assert all(torch.equal(shards[r][k], shard_state_dict(ref, cfg, r, 2)[k]) for r in range(2) for k in ref)


# ------------------------------------------------------------------------------------- pipeline
def test_stage_partition_counts_the_module():
    counts = stage_layer_counts(CFG, 2)
    assert sum(counts) == CFG.num_layers and counts[0] > counts[1]      # module + head weigh on the last stage
    plain = ModelConfig(vocab_size=64, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                        ffn_hidden_size=128, recycle_layers=0)
    assert stage_layer_counts(plain, 2) == [2, 2]
    deep = ModelConfig(vocab_size=64, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=4,
                       ffn_hidden_size=128, recycle_layers=4)
    assert stage_layer_counts(deep, 4)[-1] == 1 and min(stage_layer_counts(deep, 4)) >= 1
    with pytest.raises(ValueError, match="parallel.pp=5 must be between 1 and model.num_layers=4"):
        stage_layer_counts(CFG, 5)


def test_layer_prefixes_cover_the_model():
    prefixes = layer_prefixes(CFG)
    assert len(prefixes) == CFG.num_layers + 4 and prefixes[-2] is None    # the tied E[x_{i+1}] use
    assert len(layer_prefixes(ModelConfig(recycle_layers=0))) == ModelConfig().num_layers + 3


def test_build_engine_rejects_frozen_base_under_pp_before_starting():
    from parallel.engine import build_engine
    with pytest.raises(ValueError, match="recycle.detach_base=true with parallel.pp>1"):
        build_engine(CFG, ParallelDims(pp=2, world_size=2), {}, seed=0, detach_base=True,
                     optimizer_factory=lambda m: None)
