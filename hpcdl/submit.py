"""`hpcdl submit`: the sweep as plain sbatch scripts, for sites without Snakemake on the login
node. prepare.sbatch (if the dataset file is missing) -> workers.sbatch, a job array of W
workers of N nodes x R ranks -> report.sbatch (final retrain, aggregate, report), which runs
after the array whatever its outcome (afterany).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpcdl import store
from hpcdl.config import Config
from hpcdl.errors import EXIT_INTERRUPTED, UserError

log = logging.getLogger("hpcdl.submit")

SIGNAL_LEAD_S = 120


@dataclass(frozen=True)
class Script:
    """One sbatch script: its name (prepare, workers, report) and text."""

    name: str
    text: str


def _header(config: Config, job: str, options: dict[str, str | int | None]) -> str:
    res = config.section("resources")
    # %a is only meaningful in an array: Slurm writes 4294967294 for it in a plain job
    job_id = "%A_%a" if "array" in options else "%j"
    base: dict[str, str | int | None] = {
        "job-name": f"hpcdl-{config.name}-{job}",
        "output": str(config.paths.logs_dir / f"slurm-{job}-{job_id}.out"),
        "time": res["runtime_min"],
        "partition": res["partition"],
        "account": res["account"],
    }
    base.update(options)
    lines = [f"#SBATCH --{key}={value}" if value != "" else f"#SBATCH --{key}"
             for key, value in sorted(base.items()) if value is not None]
    return "#!/bin/bash\n" + "\n".join(lines) + "\n"


def _mpi_options(config: Config) -> dict[str, str | int | None]:
    res = config.section("resources")
    return {
        "nodes": res["nodes"],
        "ntasks-per-node": res["ranks_per_node"],
        "cpus-per-task": res["cpus_per_task"],
        "mem": res["mem_mb"],
        "gpus-per-node": res["gpus_per_node"] or None,
    }


def _run(command: str, container: str | None) -> str:
    """A command as the batch script runs it: inside the Apptainer image if one is given."""
    if container is None:
        return command
    return (f"apptainer exec --nv --bind {shlex.quote(str(Path.cwd()))} "
            f"{shlex.quote(container)} {command}")


def render(config: Config, config_file: Path, container: str | None = None) -> list[Script]:
    """The three scripts; `config_file` is the validated config the jobs read."""
    cfg = shlex.quote(str(config_file))
    workdir = shlex.quote(str(Path.cwd()))
    prelude = f"set -uo pipefail\ncd {workdir}\n"
    res = config.section("resources")
    prepare = Script("prepare", _header(config, "prepare", {
        "nodes": 1, "ntasks": 1, "cpus-per-task": 1, "mem": res["mem_mb"]})
        + prelude + _run(f"hpcdl prepare --config {cfg} --force", container) + "\n")
    worker_cmd = _run(f"hpcdl worker --config {cfg} --worker-id $SLURM_ARRAY_TASK_ID",
                      container)
    workers = Script("workers", _header(config, "workers", {
        **_mpi_options(config), "array": f"0-{res['workers'] - 1}",
        "signal": f"B:USR1@{SIGNAL_LEAD_S}", "requeue": "", "open-mode": "append"})
        + prelude + f"""\
# Slurm warns the batch shell {SIGNAL_LEAD_S} s before the time limit; pass it to every rank:
# they finish their batch, keep the epoch checkpoint, mark the trial for re-run and exit
# {EXIT_INTERRUPTED}. The job is then requeued and its worker resumes the trial.
trap 'kill -USR1 "$ranks" 2>/dev/null' USR1
srun --mpi=pmix --kill-on-bad-exit=1 {worker_cmd} &
ranks=$!
while true; do
  wait "$ranks"; status=$?
  kill -0 "$ranks" 2>/dev/null || break  # wait returned for the trap, not for srun
done
if [ "$status" -eq {EXIT_INTERRUPTED} ]; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
""")
    report = Script("report", _header(config, "report", _mpi_options(config)) + prelude + f"""\
srun --mpi=pmix --kill-on-bad-exit=1 {_run(f"hpcdl final --config {cfg}", container)}
{_run(f"hpcdl aggregate --config {cfg}", container)}
{_run(f"hpcdl report --config {cfg}", container)}
""")
    return [prepare, workers, report]


def preview(config: Config, container: str | None = None) -> str:
    """What `hpcdl submit --dry-run` shows: the scripts, each under the path it would get, then
    the sbatch commands that would chain them, job ids as placeholders."""
    scripts = "\n".join(f"# ---- {config.paths.sbatch_script(script.name)}\n{script.text}"
                         for script in render(config, config.paths.config_file, container))
    placeholders = {job: f"<{job} id>" for job in JOBS}
    commands = [" ".join([*argv[:-1], shlex.quote(argv[-1])])
                for step in chain(config, need_prepare=not config.dataset_file.exists())
                for argv in [sbatch_argv(step, placeholders)]]
    return (f"{scripts}\n# sbatch commands, in submission order (job ids as placeholders):\n"
            + "\n".join(commands))


def write(config: Config, container: str | None = None) -> None:
    """Write the validated config and the scripts under <sweep>/ and <sweep>/slurm/."""
    config.paths.slurm_dir.mkdir(parents=True, exist_ok=True)
    config.paths.logs_dir.mkdir(parents=True, exist_ok=True)
    config_file = config.paths.config_file
    with store.atomic_path(config_file) as tmp:
        tmp.write_text(yaml.safe_dump(config.as_dict(), sort_keys=False))
    for script in render(config, config_file, container):
        with store.atomic_path(config.paths.sbatch_script(script.name)) as tmp:
            tmp.write_text(script.text)


JOBS = ("prepare", "workers", "report")


@dataclass(frozen=True)
class Step:
    """One sbatch call: the job, its script, and its --dependency on an earlier job, if any."""

    job: str
    script: Path
    dependency: str | None = None  # e.g. "afterok:{prepare}", the earlier job's id filled in


def chain(config: Config, need_prepare: bool) -> list[Step]:
    """The submission order: prepare (only if the dataset file is missing) -> the worker array
    once prepare succeeded -> report after the array, whatever its outcome."""
    steps = [Step("prepare", config.paths.sbatch_script("prepare"))] if need_prepare else []
    steps.append(Step("workers", config.paths.sbatch_script("workers"),
                      "afterok:{prepare}" if need_prepare else None))
    steps.append(Step("report", config.paths.sbatch_script("report"), "afterany:{workers}"))
    return steps


def sbatch_argv(step: Step, ids: dict[str, str]) -> list[str]:
    """The sbatch command line of `step`, with the ids of the jobs it depends on."""
    options = [f"--dependency={step.dependency.format(**ids)}"] if step.dependency else []
    return ["sbatch", "--parsable", *options, str(step.script)]


def sbatch(argv: list[str]) -> str:
    """Submit; the job id. Slurm's own error reaches the user verbatim, with the script."""
    script = Path(argv[-1])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError as exc:
        raise UserError("sbatch is not on PATH: run hpcdl submit on a Slurm login node") from exc
    if done.returncode != 0:  # one line, as every user error is
        slurm_says = "; ".join(done.stderr.strip().splitlines())
        raise UserError(f"sbatch {script.name} ({script}) failed: {slurm_says}")
    return done.stdout.strip().split(";")[0]


def submit(config: Config, container: str | None = None) -> dict[str, str]:
    """Write and submit prepare (if needed), the worker array and the dependent report job.
    The caller has checked the site (Config.check_site)."""
    write(config, container)
    ids: dict[str, str] = {}
    for step in chain(config, need_prepare=not config.dataset_file.exists()):
        ids[step.job] = sbatch(sbatch_argv(step, ids))
    return ids
