"""python -m slurm.submit --config configs/X.yaml --nodes N --gpus-per-node G [--dry-run] [section.key=value ...]

Validates the run config for N x G processes (one line on stderr and exit code 2 on bad input, before anything
is written or submitted), freezes the resolved config under RUN_DIR/slurm/, renders slurm/job.sbatch.in to
RUN_DIR/slurm/job_<timestamp>.sbatch and submits it with sbatch (or, with --dry-run, prints it).
The job: one task per GPU (or --tasks-per-node processes per node on CPU-only nodes), `srun python -m
pretrain.train`, SIGUSR1 some seconds before the time limit, and a requeue when the trainer stopped for it.
See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from slurm.script_parts import fill, sbatch_block, srun_options, task_environment

TEMPLATE = Path(__file__).with_name("job.sbatch.in")
STOP_LINE = "RECYCLEGPT_STOPPED_FOR_REQUEUE"   # printed by pretrain.trainer when it saved and stopped on a signal


class SubmitError(ValueError):
    """Bad input: shown as one `error:` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not argparse's usage + error
        raise SubmitError(f"{message} (see python -m slurm.submit --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m slurm.submit", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Details: docs/slurm.md")
    p.add_argument("--config", help="run config, e.g. configs/7b.yaml (training jobs)")
    p.add_argument("--job", choices=["train", "benchmark"], default="train",
                   help="train (default), or the generation benchmark with its flags after -- (slurm/benchmark_job.py)")
    p.add_argument("--output-dir", help="--job benchmark: where the JSON, PNG, job script and log go")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node; one task (process) per GPU. 0: CPU-only nodes (gloo), see --tasks-per-node")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node; defaults to --gpus-per-node, or 1 on CPU-only nodes (G=0)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per process (also OMP_NUM_THREADS); default: the node's allocated CPUs / tasks")
    p.add_argument("--partition", help="sbatch --partition")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--time", help="time limit: MM, HH:MM:SS, D-HH[:MM[:SS]] (sbatch --time)")
    p.add_argument("--job-name", help="default: recyclegpt-<run dir name>")
    p.add_argument("--requeue", dest="requeue", action="store_true", default=True,
                   help="requeue the job after the trainer saved on SIGUSR1 (default)")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="stop after saving; resume by rerunning the same command")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="send SIGUSR1 this many seconds before the time limit (default 120)")
    p.add_argument("--python", default=sys.executable,
                   help="python on the compute nodes (default: this one, %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the tasks, e.g. NCCL_DEBUG=INFO (repeatable)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option, e.g. --sbatch-option=--exclusive (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="write the script and config snapshot, print them, do not submit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=2000 parallel.zero_stage=1")
    return p


# ------------------------------------------------------------------------------------------ checks
_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")


def time_limit_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit ('90', '1:30:00', '2-00', '2-12:00:00'); None for unlimited."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(text)
    if not m:
        raise SubmitError(f"--time={text!r} is not a Slurm time limit; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM "
                          "or D-HH:MM:SS (e.g. --time=12:00:00)")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        return g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    parts = [g[k] for k in ("a", "b", "c") if k in g]
    return {1: lambda: parts[0] * 60, 2: lambda: parts[0] * 60 + parts[1],
            3: lambda: parts[0] * 3600 + parts[1] * 60 + parts[2]}[len(parts)]()


def check_args(args) -> int:
    """Launcher-side checks; returns tasks per node."""
    if args.nodes < 1:
        raise SubmitError(f"--nodes={args.nodes} must be >= 1")
    if args.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node={args.gpus_per_node} must be >= 0 (0: CPU-only nodes)")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else (args.gpus_per_node or 1)
    if tasks < 1:
        raise SubmitError(f"--tasks-per-node={tasks} must be >= 1")
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise SubmitError(f"--tasks-per-node={tasks} with --gpus-per-node={args.gpus_per_node}: the trainer runs one "
                          f"process per GPU; drop --tasks-per-node or set it to {args.gpus_per_node}")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise SubmitError(f"--cpus-per-task={args.cpus_per_task} must be >= 1")
    if not 1 <= args.signal_seconds <= 65535:   # Slurm's limit for --signal=SIG@TIME
        raise SubmitError(f"--signal-seconds={args.signal_seconds} must be between 1 and 65535")
    if args.time:
        limit = time_limit_seconds(args.time)
        if limit is not None and args.signal_seconds >= limit:
            raise SubmitError(f"--signal-seconds={args.signal_seconds} is not shorter than --time={args.time} "
                              f"({limit} s); the warning would come before the job starts working")
    for kv in args.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv):
            raise SubmitError(f"--env {kv!r} is not KEY=VALUE")
    # An #SBATCH line ends at a newline: a control character in a value would end the directive block early
    # and sbatch would silently ignore every later directive (--chdir, --output, --signal, --requeue).
    named = [("--partition", args.partition), ("--account", args.account), ("--job-name", args.job_name),
             ("--time", args.time), ("--python", args.python)] + [("--sbatch-option", o) for o in args.sbatch_option]
    for flag, value in named:
        if value is not None and _CONTROL.search(value):
            raise SubmitError(f"{flag} {value!r} contains a control character (newline, tab, ...); "
                              "pass a single-line value")
        if value is not None and flag in ("--partition", "--account", "--job-name", "--time") and not value.strip():
            raise SubmitError(f"{flag} is empty; drop it or give a value")
        if value is not None and flag in ("--partition", "--account", "--job-name", "--time") \
                and re.search(r"\s", value):
            raise SubmitError(f"{flag} {value!r} contains whitespace, which an #SBATCH line cannot carry")
    for opt in args.sbatch_option:
        if not opt.startswith("-"):
            raise SubmitError(f"--sbatch-option {opt!r} must be an sbatch option such as --exclusive or --qos=high")
    return tasks


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_path(what: str, path: str):
    """A path that goes into #SBATCH lines (--chdir, --output) as well as the shell: sbatch reads %j, %x, ... in
    --output and strips quotes and backslashes from directive values, and a line break ends the directive."""
    if re.search(r"[\s%\"'\\]", path) or _CONTROL.search(path):
        raise SubmitError(f"{what} {path!r} contains whitespace, '%', a quote, a backslash or a control character, "
                          "which #SBATCH lines cannot carry (sbatch reads %j, %x, ... in --output and strips "
                          "quotes); use a plain path")


@contextlib.contextmanager
def _world_size_env(world: int):
    """pretrain.train.check_inputs reads the launcher's WORLD_SIZE; show it the job's."""
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def load_and_check(config: str, overrides: list[str], world: int, layout: str):
    """The run config, validated for `world` processes exactly as pretrain.train will validate it."""
    from parallel.dims import ParallelDims
    from pretrain.config import ConfigError, load_config
    from pretrain.train import check_inputs

    try:
        cfg = load_config(config, overrides)
        try:
            dims = ParallelDims.from_config(cfg.model.build(), cfg.parallel, world_size=world)
            dims.grad_accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size)
        except ValueError as e:
            raise SubmitError(f"{e} ({layout})") from None
        with _world_size_env(world):
            check_inputs(cfg)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    except SubmitError:
        raise
    except ValueError as e:
        raise SubmitError(str(e)) from None
    return cfg


# ------------------------------------------------------------------------------------------ render
def render(*, command: str, config_path: Path, slurm_dir: Path, workdir: Path, python: str, nodes: int,
           tasks_per_node: int, gpus_per_node: int, cpus_per_task: int | None, job_name: str,
           partition: str | None, account: str | None, time_limit: str | None, signal_seconds: int,
           requeue: bool, env: list[str] = (), sbatch_options: list[str] = ()) -> str:
    # no B: in --signal -> the warning goes to the job steps, i.e. straight to every training process
    extra = ["--open-mode=append", f"--signal=USR1@{signal_seconds}", "--requeue" if requeue else "--no-requeue",
             *sbatch_options]
    header = sbatch_block(job_name=job_name, nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node,
                          cpus_per_task=cpus_per_task, partition=partition, account=account, time_limit=time_limit,
                          workdir=workdir, output=f"{slurm_dir}/job_%j.out", extra=extra)
    return fill(TEMPLATE, {
        "command": command,
        "config": shlex.quote(str(config_path)),
        "sbatch_options": header,
        "slurm_dir": shlex.quote(str(slurm_dir)),   # '$(...)' or backticks in a path must stay text
        "requeue": "1" if requeue else "0",
        "task_environment": task_environment(tasks_per_node, env),
        "srun_options": srun_options(cpus_per_task),
        "python": shlex.quote(python),
    })


def _unique_stem(slurm_dir: Path) -> str:
    stem = "job_" + time.strftime("%Y%m%d-%H%M%S")
    candidate, n = stem, 1
    while (slurm_dir / f"{candidate}.sbatch").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


# ------------------------------------------------------------------------------------------ main
def validate(args) -> dict:
    """Every check, nothing written: the resolved config and the values the script is rendered from."""
    tasks = check_args(args)
    if args.job == "benchmark":
        from slurm import benchmark_job
        return dict(job="benchmark", args=args, tasks=tasks,
                    **benchmark_job.validate(args, tasks, _world_size_env, check_path, SubmitError))
    if not args.config:
        raise SubmitError("--config is required for a training job (e.g. --config configs/tiny.yaml)")
    world = args.nodes * tasks
    layout = (f"world size {world} = {args.nodes} node(s) x {tasks} "
              f"{'GPUs' if args.gpus_per_node else 'tasks'} per node")
    cfg = load_and_check(args.config, args.overrides, world, layout)
    workdir = Path.cwd()
    run_dir = (workdir / cfg.run_dir).resolve()
    for what, path in (("run.dir", run_dir), ("the working directory", workdir)):
        check_path(what, str(path))
    job_name = args.job_name or f"recyclegpt-{run_dir.name}"
    return dict(args=args, cfg=cfg, run_dir=run_dir, workdir=workdir, tasks=tasks, job_name=job_name)


def write(plan: dict, argv: list[str]) -> tuple[Path, str]:
    """Write RUN_DIR/slurm/<stem>.yaml (frozen config) and <stem>.sbatch from validate()'s plan."""
    from pretrain.config import load_config

    if plan.get("job") == "benchmark":
        return _write_benchmark(plan, argv)
    args, cfg = plan["args"], plan["cfg"]
    slurm_dir = plan["run_dir"] / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    stem = _unique_stem(slurm_dir)
    config_path = slurm_dir / f"{stem}.yaml"
    _write_atomic(config_path, "# resolved by python -m slurm.submit; the job trains with exactly this\n"
                  + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if load_config(str(config_path)) != cfg:   # the frozen copy must mean the same run
        raise RuntimeError(f"{config_path} does not reload to the same config")
    command = " ".join(("python -m slurm.submit " + shlex.join(argv)).split())   # one comment line
    text = render(command=command, config_path=config_path,
                  slurm_dir=slurm_dir, workdir=plan["workdir"], python=args.python, nodes=args.nodes,
                  tasks_per_node=plan["tasks"], gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                  job_name=plan["job_name"], partition=args.partition,
                  account=args.account, time_limit=args.time, signal_seconds=args.signal_seconds,
                  requeue=args.requeue, env=args.env, sbatch_options=args.sbatch_option)
    script = slurm_dir / f"{stem}.sbatch"
    _write_atomic(script, text, mode=0o755)
    return script, text


def _write_benchmark(plan: dict, argv: list[str]) -> tuple[Path, str]:
    from slurm import benchmark_job

    out = plan["output_dir"]
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(("python -m slurm.submit " + shlex.join(argv)).split())
    text = benchmark_job.render(plan, plan["args"], plan["tasks"], command)
    script = out / f"{_unique_stem(out)}.sbatch"
    _write_atomic(script, text, mode=0o755)
    return script, text


def _write_atomic(path: Path, text: str, mode: int = 0o644):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        msg = " ".join((out.stderr or out.stdout).split()) or f"exit code {out.returncode}"
        raise RuntimeError(f"sbatch {script} failed: {msg}")
    return out.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        plan = validate(args)   # every input error first: it is the user's to fix, wherever they run this
        if not args.dry_run and shutil.which("sbatch") is None:
            raise SubmitError("sbatch is not on PATH: run this on a Slurm login node, or add --dry-run to only "
                              "write and print the job script")
        script, text = write(plan, argv)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"# {script} (dry run, not submitted; submit it with: sbatch {script})")
        print(text, end="")
        return 0
    try:
        job_id = submit(script)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"script: {script}")
    print(f"log: {script.parent / f'job_{job_id}.out'}")
    print(f"submitted job {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
