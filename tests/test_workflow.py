"""The Snakefile with profiles/local: the whole sweep on this machine, as `make demo` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, hpcdl_env
from hpcdl import config, store

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


def test_local_profile_does_not_pin_concurrent_jobs_to_the_same_core() -> None:
    """Each MPI job of the local profile may use every core: Snakemake runs jobs side by side,
    and mpirun's default binding would put every 1-rank job on core 0."""
    profile = yaml.safe_load((REPO / "profiles" / "local" / "config.yaml").read_text())
    launcher = next(r.split("=", 1)[1].strip('"') for r in profile["default-resources"]
                    if r.startswith("mpi="))
    code = "import os; print(sorted(os.sched_getaffinity(0)))"
    jobs = [subprocess.Popen([*launcher.split(), "-n", "1", sys.executable, "-c", code],
                             env=hpcdl_env(), stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    cores = [job.communicate(timeout=120)[0].strip() for job in jobs]
    assert cores == [str(sorted(os.sched_getaffinity(0)))] * 2


def test_local_profile_runs_the_whole_sweep(results: Path) -> None:
    layer = results / "layer.yaml"
    layer.write_text(yaml.safe_dump({"results_dir": str(results), "search": {"n_trials": 3},
                                     "train": {"intra_op_threads": 1}}))
    run = subprocess.run(["snakemake", "--profile", "profiles/local", "--configfile",
                          "configs/smoke.yaml", str(layer)], cwd=REPO, env=hpcdl_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=1500, check=False)
    assert run.returncode == 0, run.stdout[-4000:]
    cfg = config.load(REPO / "configs" / "smoke.yaml", [f"results_dir={results}"])
    for name in ("config.yaml", "workers/0.done", "workers/1.done", "summary.h5",
                 "summary.csv", "best/model.keras", "best/run.h5", "scaling.h5",
                 "report.html", "figures/history.png", "logs/worker-0.log",
                 "benchmarks/worker-0.tsv"):
        assert (cfg.sweep_dir / name).exists(), name
    assert store.read_run(cfg.sweep_dir / "best" / "run.h5").attrs["stop_reason"] == "completed"
    again = subprocess.run(["snakemake", "--profile", "profiles/local", "--configfile",
                            "configs/smoke.yaml", str(layer), "-n"], cwd=REPO, env=hpcdl_env(),
                           capture_output=True, text=True, timeout=300, check=False)
    assert "Nothing to be done" in again.stdout + again.stderr  # nothing computed is redone
    # Snakemake's own report: the sweep report, the summary and every figure, with captions
    snake_report = results / "snakemake-report.html"
    made = subprocess.run(["snakemake", "--configfile", "configs/smoke.yaml", str(layer),
                           "--report", str(snake_report)], cwd=REPO, env=hpcdl_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    text = snake_report.read_text()
    for name in ("report.html", "summary.csv", "history.png", "curves.png"):
        assert name in text, name
