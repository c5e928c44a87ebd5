"""The Snakefile with profiles/local: the whole sweep on this machine, as `make demo` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from conftest import REPO, evaluate_model, hpcdl_env
from hpcdl import config, data, store, study

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


def snakemake(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """Snakemake in the repository, as `make demo` runs it."""
    return subprocess.run(["snakemake", *args], cwd=REPO, env=hpcdl_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)


def test_workflow_is_lint_clean() -> None:
    """`snakemake --lint` finds nothing, the MPI rules (which start their own containers per
    rank) included."""
    linted = snakemake("--lint", "--configfile", "configs/smoke.yaml", timeout=300)
    assert linted.returncode == 0, linted.stdout
    assert "Lints for" not in linted.stdout


def test_demo_shortened_runs_the_whole_sweep_to_its_report(tmp_path: Path) -> None:
    """`make demo` as CI can afford it: configs/demo.yaml itself (Debian's Fashion-MNIST, no
    dataset file yet, two 1-rank workers sharing one study, TPE + Hyperband), with a layer
    that shrinks only its size; then what Snakemake owes its user after a run: nothing is
    redone, and its own report holds ours. (2-rank jobs under Snakemake: tests/test_cluster.py.)
    """
    layer = tmp_path / "layer.yaml"
    layer.write_text(yaml.safe_dump({"results_dir": str(tmp_path), "search": {"n_trials": 3},
                                     "train": {"epochs": 2},
                                     "resources": {"scaling_epochs": 2}}))
    run = snakemake("--profile", "profiles/local", "--configfile", "configs/demo.yaml",
                    str(layer))
    assert run.returncode == 0, run.stdout[-4000:]
    assert "rule prepare:" in run.stdout
    cfg = config.load(REPO / "configs" / "demo.yaml", [f"results_dir={tmp_path}"])
    for name in ("config.yaml", "workers/0.done", "workers/1.done", "summary.h5",
                 "summary.csv", "best/model.keras", "best/run.h5", "scaling.h5",
                 "report.html", "figures/history.png", "logs/worker-0.log",
                 "logs/prepare.log", "benchmarks/worker-0.tsv"):
        assert (cfg.sweep_dir / name).exists(), name
    assert data.dataset_info(cfg.dataset_file).sizes == {"train": 54000, "val": 6000,
                                                          "test": 10000}
    trials = study.load_study(cfg).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3, [(t.number, t.state.name) for t in trials]
    assert {t.system_attrs["hpcdl:worker_id"] for t in finished} == {0, 1}  # both took trials
    best = store.read_run(cfg.paths.best_run)
    assert best.attrs["stop_reason"] == "completed" and best.attrs["ranks"] == 1
    reference = evaluate_model(cfg.paths.best_model, cfg.dataset_file, "test")
    assert reference["rows"] == 10000
    assert reference["accuracy"] > 0.7  # chance is 0.1
    assert reference["accuracy"] == pytest.approx(best.test["accuracy"], rel=1e-6)
    html = cfg.paths.report_html.read_text()
    assert "Sweep <code>demo</code>" in html and "final retrain (train+val)" in html
    again = snakemake("--profile", "profiles/local", "--configfile", "configs/demo.yaml",
                      str(layer), "-n", timeout=300)
    assert "Nothing to be done" in again.stdout  # nothing computed is redone
    # Snakemake's own report: the sweep report, the summary and every figure, with captions
    snake_report = tmp_path / "snakemake-report.html"
    made = snakemake("--configfile", "configs/demo.yaml", str(layer), "--report",
                     str(snake_report), timeout=300)
    assert made.returncode == 0, made.stdout[-3000:]
    text = snake_report.read_text()
    for name in ("report.html", "summary.csv", "history.png", "curves.png"):
        assert name in text, name
