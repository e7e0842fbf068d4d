"""Distributed equivalence on gloo: real processes, real DeepSpeed engines, against one process.

Each test launches `python -m parallel.check` once per rank (RANK/WORLD_SIZE/MASTER_PORT set as a launcher
would, free port, timeout), five AdamW steps with clipping and a warmup schedule on a small RecycleGPT, and
compares every rank's total/lm/recycle losses with the one-process run (relative 1e-4), plus the clipped
embedding gradient (gathered over TP, on both pipeline stages that hold the tied copy), the gathered
decoding logits, and checkpoints read back as one state dict.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.check import CFG, compare, reference_run
from parallel.setup import free_port
from parallel.tensor_parallel import unshard_state_dicts

pytestmark = pytest.mark.slow   # several gloo processes per test

ROOT = Path(__file__).resolve().parents[1]
STEPS, GLOBAL, MICRO, SEQ = 5, 8, 2, 16
TOL = 1e-4
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def ref():
    return reference_run(STEPS, GLOBAL, MICRO, SEQ)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _slurm_job_id() -> int:
    """A job id whose derived port (15000 + id % 20000, parallel.setup.launcher_env) is free now."""
    for _ in range(100):
        port = free_port()
        if 15000 <= port < 35000:
            return port - 15000
    pytest.skip("no free port in 15000..34999 for the srun-style launch")


def launch(nproc: int, args: list[str], out: Path, timeout: int = 240, launcher: str | None = "torchrun") -> None:
    """Start nproc ranks of parallel.check; fail with the logs if one fails or the run times out.

    launcher: "torchrun" sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* as torchrun or the deepspeed launcher do;
    "srun" sets only SLURM_* variables (parallel.setup maps them); None sets nothing (a plain python)."""
    cmd = [sys.executable, "-m", "parallel.check", "--no-compare", "--out", str(out),
           "--steps", str(STEPS), "--global-batch", str(GLOBAL), "--micro-batch", str(MICRO), "--seq", str(SEQ), *args]
    port = str(free_port())
    job_id = str(_slurm_job_id()) if launcher == "srun" else ""
    procs, logs = [], []
    for rank in range(nproc):
        env = _clean_env()
        if launcher == "torchrun":
            env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        elif launcher == "srun":
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(nproc), SLURM_STEP_NUM_TASKS=str(nproc),
                       SLURM_LOCALID=str(rank), SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost")
        log = open(out.parent / f"{out.name}_rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = []
        for r in failed:
            logs[r].seek(0)
            tails.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + "".join(logs[r].readlines()[-25:]))
        pytest.fail("distributed run failed:\n" + "\n".join(tails))
    for log in logs:
        log.close()


def records(out: Path, zero: int, nproc: int) -> list[dict]:
    return [torch.load(out / f"zero{zero}_rank{r}.pt", weights_only=False) for r in range(nproc)]


def check(recs: list[dict], ref: dict, expect: set) -> dict:
    diffs = compare(recs, ref)
    print(diffs)
    assert expect <= set(diffs), f"missing checks: {expect - set(diffs)}"
    for key, value in diffs.items():
        if isinstance(value, float):
            assert value <= TOL, f"{key}: relative difference {value:.3g} > {TOL}"
    return diffs


def merged_state(recs: list[dict]) -> dict:
    """One state dict from the ranks' own parameters (dp rank 0; stages merged, TP shards gathered)."""
    by_tp = {}
    for r in recs:
        if r["dp_rank"] == 0:
            by_tp.setdefault(r["tp_rank"], {}).update(r["state"])
    return unshard_state_dicts([by_tp[t] for t in sorted(by_tp)], CFG)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


LOSSES = {"loss", "lm_loss", "recycle_loss", "eval"}


def test_tp2(tmp_path, ref):
    out = tmp_path / "tp2"
    launch(2, ["--tp", "2", "--save"], out)
    recs = records(out, 0, 2)
    check(recs, ref, LOSSES | {"embedding_grad", "logits", "recycle_logits"})
    # the checkpoint's two mp_rank files, unsharded, are the trained model
    files = sorted((out / "ckpt_zero0" / "final").glob("mp_rank_*_model_states.pt"))
    assert len(files) == 2
    sds = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    assert_same_state(unshard_state_dicts(sds, CFG), merged_state(recs))


def test_pp2(tmp_path, ref):
    from parallel.ds_checkpoint import pipeline_state_dict
    out = tmp_path / "pp2"
    launch(2, ["--pp", "2", "--save"], out)
    recs = records(out, 0, 2)
    diffs = check(recs, ref, LOSSES | {"embedding_grad"})
    assert diffs["embedding_grad_stages"] == [0, 1]        # the tied copy on the last stage gets the full grad too
    assert_same_state(pipeline_state_dict(out / "ckpt_zero0" / "final", CFG), merged_state(recs))


def test_tp2_pp2(tmp_path, ref):
    """4 processes; recomputes activations (checkpointing in the decoder layers and the module), and resumes
    from a DeepSpeed checkpoint after 3 steps in a fresh engine built with another seed."""
    from parallel.ds_checkpoint import pipeline_state_dict
    out = tmp_path / "tp2pp2"
    launch(4, ["--tp", "2", "--pp", "2", "--save", "--activation-checkpointing", "--resume-at", "3"], out)
    recs = records(out, 0, 4)
    diffs = check(recs, ref, LOSSES | {"embedding_grad"})
    assert diffs["embedding_grad_stages"] == [0, 1] and all(r["resumed_at"] == 3 for r in recs)
    assert_same_state(pipeline_state_dict(out / "ckpt_zero0" / "final", CFG), merged_state(recs))


def test_zero_1_2_3(tmp_path, ref):
    """dp=2, started the way srun starts tasks (only SLURM_* variables); each stage resumes after 2 steps."""
    out = tmp_path / "zero"
    launch(2, ["--zero", "1,2,3", "--resume-at", "2"], out, launcher="srun")
    for zero in (1, 2, 3):
        recs = records(out, zero, 2)
        check(recs, ref, LOSSES | {"grad_norm"})
        assert all(r["resumed_at"] == 2 for r in recs)


def test_one_process_without_launcher(tmp_path, ref):
    """A plain `python -m ...`: no RANK/MASTER_PORT; init_distributed must fill them (no MPI discovery)."""
    out = tmp_path / "plain"
    launch(1, [], out, launcher=None)
    check(records(out, 0, 1), ref, LOSSES | {"embedding_grad", "logits"})


@pytest.mark.slow
def test_dp2_with_tp2_zero_and_pp2_zero1(tmp_path, ref):
    out = tmp_path / "tp2dp2"
    launch(4, ["--tp", "2", "--zero", "1,3"], out)
    for zero in (1, 3):
        check(records(out, zero, 4), ref, LOSSES | {"grad_norm"})
    out = tmp_path / "pp2dp2"
    launch(4, ["--pp", "2", "--zero", "0,1"], out)
    check(records(out, 0, 4), ref, LOSSES | {"embedding_grad"})
    check(records(out, 1, 4), ref, LOSSES | {"grad_norm"})


@pytest.mark.slow
def test_tp2_detach_base_trains_only_the_module(tmp_path):
    out = tmp_path / "detach"
    launch(2, ["--tp", "2", "--detach-base", "--activation-checkpointing"], out)
    check(records(out, 0, 2), reference_run(STEPS, GLOBAL, MICRO, SEQ, detach_base=True),
          LOSSES | {"logits"})


def test_bf16_engines_agree(tmp_path, ref):
    """The GPU precision (bf16), emulated on CPU: ZeRO 0 (DeepSpeed's FP16_UnfusedOptimizer, whose dummy
    init step build_engine undoes) and ZeRO 1 (fp32 partitions) train alike, and near the fp32 run."""
    from parallel.check import rel_diff
    out = tmp_path / "bf16"
    launch(2, ["--bf16", "--zero", "0,1"], out)
    z0, z1 = records(out, 0, 2)[0], records(out, 1, 2)[0]
    assert rel_diff(z0["losses"], z1["losses"]) <= 5e-4 and rel_diff(z0["eval"], z1["eval"]) <= 5e-4
    assert rel_diff(z1["losses"], ref["losses"]) <= 1e-2


@pytest.mark.slow
def test_draft_depths_and_base_target_tp2_pp2_and_zero_with_resume(tmp_path):
    """recycle.train_depth 3 with per-depth weights and target=mix (the base's distribution through the
    vocabulary-parallel KL): TP=2 x PP=2 with a resume mid-run, and ZeRO 1/3 over dp=2 with a resume."""
    from parallel.check import RecycleObjective
    objective = RecycleObjective(target="mix", depth=3, depth_weights=(1.0, 1 / 2, 1 / 3))
    ref = reference_run(STEPS, GLOBAL, MICRO, SEQ, objective=objective)
    depth_losses = LOSSES | {"recycle_loss_d2", "recycle_loss_d3"}
    args = ["--target", "mix", "--train-depth", "3"]
    out = tmp_path / "tp2pp2"
    launch(4, ["--tp", "2", "--pp", "2", "--resume-at", "3", *args], out)
    recs = records(out, 0, 4)
    check(recs, ref, depth_losses | {"embedding_grad"})
    assert all(r["resumed_at"] == 3 for r in recs)
    out = tmp_path / "zero"
    launch(2, ["--zero", "1,3", "--resume-at", "2", *args], out)
    for zero in (1, 3):
        check(records(out, zero, 2), ref, depth_losses | {"grad_norm"})


def test_check_exits_non_zero_on_a_mismatch(tmp_path):
    """bf16 engines against the fp32 one-process run differ by more than the 1e-4 tolerance: parallel.check must
    say MISMATCH and fail (a launcher or CI script sees the exit code, not the printed line)."""
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, "-m", "parallel.check", "--bf16", "--steps", "2", "--global-batch", "4",
                           "--micro-batch", "2", "--seq", str(SEQ), "--out", str(out)], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert "MISMATCH" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 1
