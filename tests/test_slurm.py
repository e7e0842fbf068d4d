"""slurm.submit: rendering and input errors (no cluster needed), then real jobs on a Slurm controller.

The cluster tests need `sbatch`/`sinfo` and a cluster that answers; `bash scripts/ci_slurm_setup.sh` starts a
one-node cluster on localhost. Without one they are skipped, unless RECYCLEGPT_REQUIRE_SLURM=1 (CI sets it
after running the setup script), where a missing cluster is a failure rather than a silent skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import load_config
from slurm import submit

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.ffn_hidden_size=128", "model.max_seq_len=64", "train.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.log_interval=1", "train.eval_iters=2", "train.warmup_steps=2",
        "log.plot=false", "log.tensorboard=false"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture
def fake_data(tmp_path):
    """A data prefix that passes the submit-time checks (they look for the files, not into them)."""
    prefix = tmp_path / "data" / "fake"
    prefix.parent.mkdir()
    for ext in (".bin", ".idx"):
        prefix.with_suffix(ext).write_bytes(b"")
    return prefix


def run_submit(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = submit.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def dry_run(tmp_path, fake_data, monkeypatch, capsys, *extra, nodes=2, gpus=4, overrides=(), run_name="run"):
    run_dir = tmp_path / run_name
    tasks = int(extra[extra.index("--tasks-per-node") + 1]) if "--tasks-per-node" in extra else gpus or 1
    args = ["--config", "configs/tiny.yaml", "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--dry-run",
            *extra, *TINY, f"train.global_batch_size={2 * nodes * tasks}", f"data.prefixes=[{fake_data}]",
            f"run.dir={run_dir}", *overrides]
    rc, out, err = run_submit(args, monkeypatch, capsys)
    assert rc == 0, err
    first, _, text = out.partition("\n")
    script = Path(re.match(r"# (\S+\.sbatch) \(dry run", first).group(1))
    assert script.read_text() == text and script.parent == run_dir / "slurm"
    return script, text, run_dir


def sbatch_options(text: str) -> list[str]:
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


# ------------------------------------------------------------------------------------ rendering
def test_dry_run_renders_one_task_per_gpu(tmp_path, fake_data, monkeypatch, capsys):
    script, text, run_dir = dry_run(tmp_path, fake_data, monkeypatch, capsys, "--partition", "gpu", "--time",
                                    "12:00:00", "--account", "proj", "--job-name", "rg7b", "--cpus-per-task", "6",
                                    "--env", "NCCL_DEBUG=INFO", "--sbatch-option=--exclusive",
                                    overrides=["parallel.zero_stage=1", "train.steps=7"])
    opts = sbatch_options(text)
    for want in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--partition=gpu",
                 "--account=proj", "--time=12:00:00", "--job-name=rg7b", f"--chdir={REPO}",
                 f"--output={run_dir}/slurm/job_%j.out", "--open-mode=append", "--signal=USR1@120", "--requeue",
                 "--exclusive"):
        assert want in opts, (want, opts)
    # srun starts the trainer on the frozen, resolved config; srun needs --cpus-per-task itself (Slurm >= 22.05)
    srun = " ".join(re.search(r"^srun (.*?)&$", text.replace("\\\n", " "), re.M).group(1).split())
    config = re.search(r"--config (\S+)", srun).group(1)
    assert "--kill-on-bad-exit=1" in srun and "--cpus-per-task=6" in srun
    assert f"""bash -c 'trap "" USR1; exec "$0" "$@"' {sys.executable} -m pretrain.train --config {config}""" in srun
    cfg = load_config(config)
    assert (cfg.parallel.zero_stage, cfg.train.steps, cfg.model.overrides["hidden_size"]) == (1, 7, 64)
    assert cfg.run.dir == str(run_dir)
    assert Path(config) == script.with_suffix(".yaml")
    # environment, and the requeue only after the trainer's stop line and not while Slurm ends the job
    for want in ("export MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))", "export OMP_NUM_THREADS=",
                 "NCCL_ASYNC_ERROR_HANDLING=1", "export NCCL_DEBUG=INFO", "unset RANK WORLD_SIZE LOCAL_RANK",
                 "REQUEUE=1", submit.STOP_LINE, 'scontrol requeue "$SLURM_JOB_ID"', "kill -USR1 \"$SRUN_PID\""):
        assert want in text, want
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_dry_run_cpu_nodes_and_no_requeue(tmp_path, fake_data, monkeypatch, capsys):
    _, text, _ = dry_run(tmp_path, fake_data, monkeypatch, capsys, "--no-requeue", "--signal-seconds", "300",
                         nodes=3, gpus=0)
    opts = sbatch_options(text)
    assert "--ntasks-per-node=1" in opts and "--no-requeue" in opts and "--signal=USR1@300" in opts
    assert not any(o.startswith(("--gpus", "--cpus-per-task", "--time", "--partition")) for o in opts)
    assert "REQUEUE=0" in text
    _, text, _ = dry_run(tmp_path, fake_data, monkeypatch, capsys, "--tasks-per-node", "2", nodes=1, gpus=0)
    assert "--ntasks-per-node=2" in sbatch_options(text)


def test_two_submissions_get_their_own_files(tmp_path, fake_data, monkeypatch, capsys):
    a, _, _ = dry_run(tmp_path, fake_data, monkeypatch, capsys)
    b, _, _ = dry_run(tmp_path, fake_data, monkeypatch, capsys)
    assert a != b and a.exists() and b.exists() and b.with_suffix(".yaml").exists()


def test_time_limits():
    assert submit.time_limit_seconds("90") == 5400
    assert submit.time_limit_seconds("1:30") == 90
    assert submit.time_limit_seconds("12:00:00") == 43200
    assert submit.time_limit_seconds("2-12") == 216000
    assert submit.time_limit_seconds("1-00:30:05") == 88205
    assert submit.time_limit_seconds("UNLIMITED") is None


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("extra, overrides, message", [
    (["--nodes", "1", "--gpus-per-node", "2"], ["parallel.tp=4"], "does not divide the world size 2"),
    (["--nodes", "3", "--gpus-per-node", "2"], ["parallel.tp=4"], "valid (tp, pp) for 6 processes"),
    (["--nodes", "1", "--gpus-per-node", "4"], ["train.global_batch_size=6"], "not a multiple"),
    (["--nodes", "1", "--gpus-per-node", "1"], ["train.stepz=3"], "unknown config key train.stepz"),
    (["--nodes", "1", "--gpus-per-node", "1"], ["data.prefixes=[/nonexistent/x]"], "/nonexistent/x.bin not found"),
    (["--nodes", "0", "--gpus-per-node", "1"], [], "--nodes=0 must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "4", "--tasks-per-node", "2"], [], "one process per GPU"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "soon"], [], "is not a Slurm time limit"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "1"], [], "not shorter than --time=1"),
    (["--gpus-per-node", "1"], [], "the following arguments are required: --nodes"),
    (["--nodes", "1", "--gpus-per-node", "1"], ["run.dir=/tmp/run %j"], "contains whitespace, '%'"),
    (["--nodes", "1", "--gpus-per-node", "1"], ['run.dir=/tmp/a"b'], "a quote"),
    (["--nodes", "1", "--gpus-per-node", "1"], ["run.dir=/tmp/a\\b"], "a backslash"),
    # a line break would end the #SBATCH block: the directives after it would be silently ignored
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu\n#SBATCH --chdir=/"], [], "--partition"),
    (["--nodes", "1", "--gpus-per-node", "1", "--account", "a\nrm -rf ~"], [], "--account 'a\\nrm"),
    (["--nodes", "1", "--gpus-per-node", "1", "--job-name", "x\ry"], [], "--job-name"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "10\n"], [], "--time"),
    (["--nodes", "1", "--gpus-per-node", "1", "--sbatch-option", "--exclusive\necho hi"], [], "--sbatch-option"),
    (["--nodes", "1", "--gpus-per-node", "1", "--job-name", "two words"], [], "contains whitespace"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, fake_data, monkeypatch, capsys, extra, overrides, message):
    """Each input error is its own line, also on a machine without Slurm (no sbatch on PATH): the checks come
    before sbatch is looked for."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    run_dir = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", *extra, *TINY, f"data.prefixes=[{fake_data}]", f"run.dir={run_dir}",
            *overrides]
    rc, out, err = run_submit(args, monkeypatch, capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not run_dir.exists()   # nothing written, nothing submitted


@pytest.mark.parametrize("name", ["$(>PWNED)", "`>PWNED`", "a;>PWNED", "it's", "$HOME&x|y<z>"])
def test_hostile_run_dir_stays_text(tmp_path, fake_data, monkeypatch, capsys, name):
    """A run directory with shell syntax in it: the script parses (bash -n), and the job's LOG line evaluates to
    the literal path without running anything."""
    if "'" in name:   # quotes cannot reach #SBATCH lines: refused with one line
        rc, out, err = run_submit(["--config", "configs/tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
                                   "--dry-run", *TINY, f"data.prefixes=[{fake_data}]", f"run.dir={tmp_path / name}"],
                                  monkeypatch, capsys)
        assert rc == 2 and "a quote" in err and len(err.splitlines()) == 1
        return
    script, text, _ = dry_run(tmp_path, fake_data, monkeypatch, capsys, nodes=1, gpus=0, run_name=name)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    log_line = next(line for line in text.splitlines() if line.startswith("LOG="))
    out = subprocess.run(["bash", "-c", f'SLURM_JOB_ID=7\n{log_line}\nprintf %s "$LOG"'], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"{tmp_path / name}/slurm/job_7.out", out
    assert not list(tmp_path.rglob("PWNED"))
    assert f"--output={tmp_path / name}/slurm/job_%j.out" in sbatch_options(text)


def test_task_environment_runs_under_set_e_when_scontrol_knows_no_node_addr(tmp_path):
    """The rendezvous block both job scripts share (slurm/task_env.sh.in), run the way the benchmark script runs it
    (set -euo pipefail): a node without a NodeAddr line must fall back to its name, not abort the job."""
    from slurm.script_parts import task_environment

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"   # knows the allocation's host list, prints no NodeAddr
    scontrol.write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo node-a\nexit 0\n')
    scontrol.chmod(0o755)
    script = ("set -euo pipefail\n" + task_environment(2, ["EXTRA=a b"])
              + '\nprintf "%s|%s|%s|%s" "$MASTER_ADDR" "$MASTER_PORT" "$OMP_NUM_THREADS" "$EXTRA"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node-a", "SLURM_JOB_ID": "7",
           "SLURM_CPUS_ON_NODE": "4"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "node-a|15007|2|a b"


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path):
    """The real entry point: one line on stderr, exit code 2, before sbatch is ever looked at."""
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/nope.yaml", "--nodes", "1",
                          "--gpus-per-node", "0", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["error: config file configs/nope.yaml does not exist; presets live in "
                                       "configs/*.yaml"]


# ------------------------------------------------------------------------------------ real cluster
def _cluster_state() -> str | None:
    """None if a cluster takes jobs, else why not."""
    missing = [c for c in ("sbatch", "sinfo", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        return f"Slurm client commands not found: {', '.join(missing)} (run: bash scripts/ci_slurm_setup.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no slurmctld answers (run: bash scripts/ci_slurm_setup.sh)"
    if out.returncode != 0:
        return f"sinfo fails: {' '.join(out.stderr.split())} (run: bash scripts/ci_slurm_setup.sh)"
    if not {"idle", "mixed", "allocated", "completing"} & set(out.stdout.split()):
        return f"no Slurm node takes jobs (states: {' '.join(out.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _cluster_state()
    if why:
        if os.environ.get("RECYCLEGPT_REQUIRE_SLURM") == "1":
            pytest.fail(f"RECYCLEGPT_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def sotu(cluster, sotu_prefix):
    """The bundled corpus, tokenized once per session (tests/conftest.py); only once a cluster answers."""
    return sotu_prefix


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def submit_job(tmp_path, sotu, name: str, overrides: list[str]) -> tuple[str, Path, Path]:
    run_dir = tmp_path / name
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/tiny.yaml", "--nodes", "1",
                          "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:10:00", "--job-name", name,
                          *TINY, f"data.prefixes=[{sotu}]", f"run.dir={run_dir}", *overrides],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"^submitted job (\d+)$", out.stdout, re.M).group(1)
    return job_id, run_dir, run_dir / "slurm" / f"job_{job_id}.out"


def wait_for(job_id: str, log: Path, done, timeout: float, what: str, poll: float = 1.0) -> dict:
    """Poll `scontrol show job` until done(info); fail at once if the job ended first, or after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if done(info):
            return info
        ended = info.get("JobState") in TERMINAL
        if ended or time.monotonic() > deadline:
            log_text = log.read_text()[-4000:] if log.exists() else "(no log)"
            why = f"the job ended ({info.get('JobState')})" if ended else f"not within {timeout:.0f} s"
            raise AssertionError(f"job {job_id}: waiting for {what}: {why}; {info}\n{log_text}")
        time.sleep(poll)


def train_rows(run_dir: Path, while_running: bool = False) -> list[dict]:
    """The training rows of metrics.jsonl; while the job runs, a last line still being written is left out."""
    path = run_dir / "metrics.jsonl"
    if while_running and not path.exists():
        return []
    lines = path.read_text().splitlines()
    if while_running and lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines = lines[:-1]
    return [r for r in map(json.loads, filter(str.strip, lines)) if "split" not in r]


@pytest.fixture
def cancel_afterwards():
    jobs = []
    yield jobs
    for job_id in jobs:   # never leave a job of ours on the cluster after a failure
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)


@pytest.mark.slow
def test_sbatch_refusal_is_one_line(tmp_path, sotu):
    """A job the cluster refuses (unknown partition): sbatch's reason on one line, exit code 1."""
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/tiny.yaml", "--nodes", "1",
                          "--gpus-per-node", "0", "--partition", "no-such-partition", *TINY,
                          f"data.prefixes=[{sotu}]", f"run.dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == "", out.stdout
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: sbatch ")
    assert "partition" in out.stderr.lower()


@pytest.mark.slow
def test_job_trains_two_tasks_on_the_cluster(tmp_path, sotu, cancel_afterwards):
    job_id, run_dir, log = submit_job(tmp_path, sotu, "rg-ci-train", ["train.steps=4", "checkpoint.interval=2"])
    cancel_afterwards.append(job_id)
    info = wait_for(job_id, log, lambda i: i.get("JobState") in TERMINAL, 150, "the end of the job")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert re.search(r"world 2 \(tp 1, pp 1, dp 2\)", text), text[-4000:]
    # the rendezvous address is the head node's NodeAddr (scripts/ci_slurm_setup.sh names the node something DNS
    # does not know, as cloud clusters do): with the node name the ranks would wait 30 minutes and fail
    node = subprocess.run(["scontrol", "show", "node", info["NodeList"]], capture_output=True, text=True).stdout
    addr = re.search(r"NodeAddr=(\S+)", node).group(1)
    assert f"2 tasks, master {addr}:" in text, text[-4000:]
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert (run_dir / "checkpoints" / "step_2").is_dir()


@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes(tmp_path, sotu, cancel_afterwards):
    """Pre-emption: SIGUSR1 (what --signal=USR1@N sends before the time limit) -> the trainer saves and prints
    the stop line -> the batch script requeues the job -> it resumes from latest and finishes the total steps."""
    steps = 80
    job_id, run_dir, log = submit_job(tmp_path, sotu, "rg-ci-requeue",
                                      [f"train.steps={steps}", "checkpoint.interval=1000", "parallel.zero_stage=1"])
    cancel_afterwards.append(job_id)
    # the trainer's signal handler is in once it logs steps; signal soon after, well before the last step
    wait_for(job_id, log, lambda i: len(train_rows(run_dir, while_running=True)) >= 2, 120, "training steps", 0.25)
    # --full: the batch shell gets it too (it passes it on); the tasks may see it twice, which is harmless
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], check=True, timeout=20)
    info = wait_for(job_id, log, lambda i: i.get("JobState") in TERMINAL, 150, "the requeued job's end")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-4000:]
    stop = re.search(r"RECYCLEGPT_STOPPED_FOR_REQUEUE: received SIGUSR1, saved step_(\d+)", text)
    assert stop, text[-4000:]
    stopped_at = int(stop.group(1))
    assert 2 <= stopped_at < steps
    assert f"requeueing job {job_id}" in text and f"job {job_id} (restart 1)" in text
    assert re.search(rf"resumed from step_{stopped_at} at step {stopped_at}", text), text[-4000:]
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
