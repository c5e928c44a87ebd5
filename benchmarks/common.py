"""Helpers shared by the benchmark scripts: machine facts, statistics, RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SCRIPT = Path(sys.argv[0]).resolve()  # now: a script may chdir before it records its command
FASHION_MNIST = REPO / "results" / "data" / "fashion_mnist.h5"
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONPATH": str(REPO)}


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, **MPI_ENV, **extra}


def run(command: Sequence[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a command, fail loudly with its output if it fails."""
    done = subprocess.run(list(command), capture_output=True, text=True, env=env(**extra_env),
                          check=False)
    if done.returncode != 0:
        sys.exit(f"benchmark step failed: {shlex.join(command)}\n{done.stderr[-3000:]}")
    return done


def fashion_mnist(results_dir: Path | None = None) -> Path:
    """Prepare Fashion-MNIST once (from Debian's package); link it into a sweep's results_dir."""
    if not FASHION_MNIST.exists():
        run(["hpcdl", "prepare", "fashion_mnist", "--out", str(FASHION_MNIST)])
    if results_dir is None:
        return FASHION_MNIST
    linked = results_dir / "data" / FASHION_MNIST.name
    if not linked.exists() and not linked.is_symlink():
        linked.parent.mkdir(parents=True, exist_ok=True)
        linked.symlink_to(FASHION_MNIST)
    return linked


def run_workers(config_path: Path, workers: int) -> None:
    """Concurrent `hpcdl worker` processes on one study until its budget is spent, as
    Snakemake's local profile starts them."""
    jobs = [subprocess.Popen(["hpcdl", "worker", "--config", str(config_path),
                              "--worker-id", str(i)], env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for i in range(workers)]
    for job in jobs:
        _, stderr = job.communicate()
        if job.returncode != 0:
            sys.exit(f"worker failed on {config_path}:\n{stderr[-3000:]}")


def machine() -> str:
    """One line: CPU, cores, memory, OS, Python, TensorFlow, Horovod versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = run([sys.executable, "-c", "import hpcdl, tensorflow as tf, horovod, optuna; "
                    "print(tf.__version__, horovod.__version__, optuna.__version__)"]).stdout
    tf_v, hvd_v, optuna_v = versions.split()
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.platform()}, "
            f"Python {platform.python_version()}, TensorFlow {tf_v}, Horovod {hvd_v}, "
            f"Optuna {optuna_v}")


def summary(values: Sequence[float]) -> str:
    """median [min-max] (n)."""
    median = statistics.median(values)
    return f"{median:.4g} [{min(values):.4g}-{max(values):.4g}] (n={len(values)})"


def invocation() -> str:
    """The command line this script was started with, as typed from the repository root: the
    record must name every option that shaped the figures."""
    return shlex.join(["python", str(SCRIPT.relative_to(REPO)), *sys.argv[1:]])


def append_results(title: str, table: list[list[str]], notes: str) -> None:
    """Append one benchmark's results, with where and how they were measured."""
    command = invocation()
    header, *rows = table
    lines = [f"\n## {title} — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n",
             f"Machine: {machine()}  ",
             f"Command: `{command}`\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", notes.strip(), ""]
    text = "\n".join(lines)
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/ "
                           "(`make bench`); newest last. Values are medians [min-max] over "
                           "repetitions; ratios come from runs alternated in the same session.\n")
    with RESULTS.open("a") as handle:
        handle.write(text)
