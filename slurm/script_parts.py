"""What every rendered job script shares (slurm/job.sbatch.in, slurm/benchmark.sbatch.in): the #SBATCH block,
the per-task environment (slurm/task_env.sh.in: rendezvous at the head node's NodeAddr, threads per task, the
user's --env exports) and placeholder filling. One home, so a fix to the rendezvous reaches every job.

Values are quoted here or refused earlier (slurm.submit.check_path / check_args): nothing a user typed reaches
the script as shell code.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

TASK_ENV = Path(__file__).with_name("task_env.sh.in")


def sbatch_block(*, job_name: str, nodes: int, tasks_per_node: int, gpus_per_node: int, cpus_per_task: int | None,
                 partition: str | None, account: str | None, time_limit: str | None, workdir: Path, output: str,
                 extra: list[str] = ()) -> str:
    """The #SBATCH lines: resources first, then placement and the log; `extra` (the user's --sbatch-option and
    the job kind's own) last, so they win where sbatch reads a directive twice."""
    opts = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}"]
    if gpus_per_node:
        opts.append(f"--gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        opts.append(f"--cpus-per-task={cpus_per_task}")
    opts += [f"--{k}={v}" for k, v in (("partition", partition), ("account", account), ("time", time_limit)) if v]
    opts += [f"--chdir={workdir}", f"--output={output}", *extra]
    return "\n".join(f"#SBATCH {o}" for o in opts)


def srun_options(cpus_per_task: int | None) -> str:
    # srun does not take --cpus-per-task from the allocation since Slurm 22.05; pass it on explicitly.
    return f" --cpus-per-task={cpus_per_task}" if cpus_per_task else ""


def task_environment(tasks_per_node: int, env: list[str] = ()) -> str:
    exports = "\n".join(f"export {kv.split('=', 1)[0]}={shlex.quote(kv.split('=', 1)[1])}" for kv in env)
    return fill(TASK_ENV, {"tasks_per_node": str(tasks_per_node), "env_exports": exports}).rstrip("\n")


def fill(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{\w+\}\}", text)
    if leftover:
        raise RuntimeError(f"{template} has unfilled placeholders {leftover}")
    return text
