"""Process groups: launcher environment, torch.distributed via DeepSpeed, megatron-core and DeepSpeed
topologies built from one `ParallelDims` and checked to agree (DESIGN.md §2b).

    dims = ParallelDims.from_config(model_cfg, cfg.parallel)   # validates before anything starts
    ctx = init_distributed(dims)                                # -> DistContext (ranks, device, topology)
    ...
    destroy()
"""
from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.dims import ParallelDims


# Seconds a rank waits to reach the rendezvous (MASTER_ADDR:MASTER_PORT) before it gives up with one clear line.
# torch's own default is the 30-minute collective timeout: an unreachable master would burn the allocation.
RENDEZVOUS_TIMEOUT_ENV = "RECYCLEGPT_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 60.0


class RendezvousError(RuntimeError):
    """The ranks cannot meet: MASTER_ADDR does not resolve or MASTER_ADDR:MASTER_PORT cannot be reached."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[003-005,7],cpu1' -> 'gpu003' (no scontrol needed)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def launcher_env(environ=None) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for torch.distributed, from whatever
    started us: torchrun or the deepspeed launcher (already set), srun (SLURM_*), mpirun (OMPI_*), or
    nothing (one process). Pure: returns only the variables that are missing."""
    env = os.environ if environ is None else environ
    out = {}
    if "RANK" not in env:
        if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
            # srun: one task per process. SLURM_STEP_NUM_TASKS is the step's size (srun -n), SLURM_NTASKS
            # the allocation's; they differ when a batch script runs fewer tasks than it allocated.
            out["RANK"] = env["SLURM_PROCID"]
            out["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
            out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
            if "MASTER_ADDR" not in env and env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST")):
                out["MASTER_ADDR"] = _first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST")))
            if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
                # Every task must agree on the port without talking: derive it from the job id.
                out["MASTER_PORT"] = str(15000 + int(env["SLURM_JOB_ID"]) % 20000)
        elif "OMPI_COMM_WORLD_RANK" in env:
            out["RANK"] = env["OMPI_COMM_WORLD_RANK"]
            out["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
            out["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    merged = {**env, **out}
    world = int(merged.get("WORLD_SIZE", "1"))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        if key not in merged:
            out[key] = value
    if "MASTER_PORT" not in merged:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} but MASTER_PORT is not set; export MASTER_PORT (and MASTER_ADDR) "
                             "or start with torchrun / deepspeed / srun")
        out["MASTER_PORT"] = str(free_port())
    return out


@dataclass
class DistContext:
    dims: ParallelDims
    rank: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: torch.device
    topology: object          # deepspeed PipeModelDataParallelTopology
    grid: object | None       # deepspeed PipelineParallelGrid (the DeepSpeed `mpu`) when pp == 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


_CTX: DistContext | None = None


def current() -> DistContext:
    if _CTX is None:
        raise RuntimeError("process groups are not initialised: call parallel.setup.init_distributed(dims) first")
    return _CTX


def init_distributed(dims: ParallelDims, backend: str | None = None, timeout_minutes: int = 30) -> DistContext:
    """Start torch.distributed (nccl on GPU, gloo on CPU), then megatron-core's and DeepSpeed's groups."""
    global _CTX
    import datetime

    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid
    from megatron.core import parallel_state as ps

    os.environ.update(launcher_env())
    world = int(os.environ["WORLD_SIZE"])
    if world != dims.world_size:
        raise ValueError(f"the launcher started {world} processes but {dims} expects {dims.world_size}; "
                         f"launch {dims.world_size} processes or change parallel.tp / parallel.pp")
    on_gpu = torch.cuda.is_available()
    backend = backend or ("nccl" if on_gpu else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if on_gpu and backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # A second call in one process (benchmarks build several engines side by side) keeps the process group it
    # has; only megatron's and DeepSpeed's groups below are rebuilt for the new dims.
    if not dist.is_initialized():
        store = rendezvous_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                 int(os.environ["RANK"]), world, timeout)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=timeout)
    elif dist.get_world_size() != world:
        raise ValueError(f"a process group of {dist.get_world_size()} processes exists; {dims} needs {world}")
    # DeepSpeed wraps the process group that is already there
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    rank = dist.get_rank()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
                                 distributed_timeout_minutes=timeout_minutes)
    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    check_agreement(dims, topology, rank)
    # pp == 1: the grid is the `mpu` DeepSpeed needs for TP-aware grad norms and the data-parallel group.
    # pp > 1: DeepSpeed's PipelineModule builds its own grid from the same topology.
    grid = PipelineParallelGrid(topology=topology) if dims.pp == 1 else None
    pp_rank, dp_rank, tp_rank = dims.coords(rank)
    _CTX = DistContext(dims, rank, local_rank, tp_rank, pp_rank, dp_rank, backend, device, topology, grid)
    return _CTX


def rendezvous_store(addr: str, port: int, rank: int, world: int, timeout):
    """The TCPStore every rank meets at, connected within RECYCLEGPT_RENDEZVOUS_TIMEOUT seconds (default 60) or a
    RendezvousError; once connected, the store waits as long as the collectives (`timeout`)."""
    import datetime

    connect_s = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV) or DEFAULT_RENDEZVOUS_TIMEOUT_S)
    fix = ("set MASTER_ADDR to an address of the rank-0 host that every node reaches (in a Slurm job: the head "
           "node's NodeAddr from `scontrol show node`)")
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RendezvousError(f"rank {rank}: MASTER_ADDR={addr} does not resolve ({e.strerror}); {fix}") from None
    try:
        # Under torchrun the agent already hosts the store at MASTER_PORT (as torch's env:// rendezvous knows).
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent_store,
                              timeout=datetime.timedelta(seconds=connect_s), wait_for_workers=False,
                              multi_tenant=True)
    except (RuntimeError, OSError) as e:   # torch's DistNetworkError / DistStoreError, or the bind itself
        cause = " ".join(str(e).split("\n")[0].split())[:200]
        raise RendezvousError(f"rank {rank}: could not reach the rendezvous MASTER_ADDR={addr} MASTER_PORT={port} "
                              f"within {connect_s:.0f} s ({cause}); {fix}, and check that the port is open "
                              f"(wait longer with {RENDEZVOUS_TIMEOUT_ENV}=SECONDS)") from None
    store.set_timeout(timeout)
    return store


def check_agreement(dims: ParallelDims, topology, rank: int):
    """megatron-core's groups, DeepSpeed's topology and ParallelDims must put this rank with the same peers."""
    from megatron.core import parallel_state as ps

    megatron = {"tp": ps.get_tensor_model_parallel_group(), "dp": ps.get_data_parallel_group(),
                "pp": ps.get_pipeline_model_parallel_group()}
    deepspeed_axis = {"tp": "model", "dp": "data", "pp": "pipe"}
    for axis, group in megatron.items():
        ours = next(g for g in dims.groups(axis) if rank in g)
        theirs = sorted(dist.get_process_group_ranks(group))
        ds = next(g for g in topology.get_axis_comm_lists(deepspeed_axis[axis]) if rank in g) \
            if topology.get_dim(deepspeed_axis[axis]) > 1 else [rank]
        if not (ours == theirs == sorted(ds)):
            raise RuntimeError(f"rank {rank}: {axis} group disagrees: ParallelDims {ours}, megatron-core {theirs}, "
                               f"DeepSpeed {sorted(ds)}")


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (collective; just `flag` without a process group). The one
    way ranks agree on a decision: stop and save together, fail a checkpoint load together."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def seed_everything(seed: int, dims: ParallelDims | None = None) -> int:
    """The same seed on every rank, for python, numpy and torch (CPU and CUDA).

    Why the same everywhere: the weights never come from the per-rank RNG (they are the seeded one-device
    model's, sharded; parallel.tensor_parallel.init_state_dict), the model has no dropout, and data order is
    the sampler's, keyed by the dp rank. Equal streams are what TP ranks need for anything replicated; if
    dropout is ever added, offset the seed by tp_rank inside TP-split regions only (what megatron's CUDA RNG
    tracker does, which does not run on CPU). `dims` is accepted for that future use.
    """
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass
    torch.manual_seed(seed)   # also seeds every CUDA device
    return seed


def destroy():
    """Tear down megatron-core's groups and the default process group (safe to call twice)."""
    global _CTX
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm
        ds_comm.cdb = None      # let a later init_distributed start afresh in the same process
    except ImportError:
        pass
    _CTX = None
