"""`python -m slurm.submit --job benchmark ... --output-dir DIR -- BENCHMARK FLAGS`: the generation benchmark as a
Slurm job, one task per GPU (or --tasks-per-node CPU processes), each task one tensor-parallel rank.

    python -m slurm.submit --job benchmark --nodes 1 --gpus-per-node 2 --output-dir runs/bench7b \\
        -- --preset 7b --random-init --dtype bf16 --modes standard,recycle,verify

The benchmark's flags are checked here exactly as every task will check them (with the job's world size as
the launcher's), so a --tp that does not divide the model fails before anything is submitted. The JSON and
PNG land in DIR as benchmark_<jobid>.json/.png, next to the job script and its log.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from slurm.script_parts import fill, sbatch_block, srun_options, task_environment

TEMPLATE = Path(__file__).with_name("benchmark.sbatch.in")


def validate(args, tasks: int, world_size_env, check_path, error) -> dict:
    """The benchmark flags (args.overrides: what followed `--`) checked for `nodes x tasks` ranks."""
    from inference.benchmark import build_parser
    from inference.cli import UsageError, check_model_args

    if not args.output_dir:
        raise error("--job benchmark needs --output-dir DIR: the tasks write the JSON and PNG there")
    output_dir = Path(args.output_dir).resolve()
    check_path("--output-dir", str(output_dir))
    bench = list(args.overrides)
    if any(a == "--output" or a.startswith("--output=") for a in bench):
        raise error("pass --output-dir DIR to slurm.submit instead of the benchmark's --output (the job names the "
                    "file benchmark_<jobid>.json)")
    world = args.nodes * tasks
    try:
        with world_size_env(world):
            parsed = build_parser().parse_args([*bench, "--output", str(output_dir / "check.json")])
            check_model_args(parsed)
    except UsageError as err:
        raise error(f"benchmark flags after --: {err} (world size {world} = {args.nodes} node(s) x {tasks} tasks)") \
            from None
    return dict(output_dir=output_dir, benchmark_args=bench, job_name=args.job_name or "recyclegpt-benchmark")


def render(plan: dict, args, tasks: int, command: str) -> str:
    return fill(TEMPLATE, {
        "command": command,
        "sbatch_options": sbatch_block(
            job_name=plan["job_name"], nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account, time_limit=args.time,
            workdir=Path.cwd(), output=f"{plan['output_dir']}/job_%j.out", extra=args.sbatch_option),
        "task_environment": task_environment(tasks, args.env),
        "srun_options": srun_options(args.cpus_per_task),
        "python": shlex.quote(args.python),
        "benchmark_args": shlex.join(plan["benchmark_args"]),
        "output_dir": shlex.quote(str(plan["output_dir"])),
    })
