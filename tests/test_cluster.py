"""The workflow on a real Slurm cluster (two emulated nodes, started by tests/cluster/slurm-up.sh):
Snakemake with profiles/slurm, a worker job cancelled and retried, plain `hpcdl submit`,
the dry run with the cluster down, and bad input refused before any job is submitted."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import REPO, hpcdl_env, run_hpcdl
from hpcdl import config, store, study

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CLUSTER = REPO / "tests" / "cluster"
# Open MPI between the two emulated nodes of one host: TCP on loopback (stack notes).
MULTINODE_MPI = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo",
                 "OMPI_MCA_oob_tcp_if_include": "lo"}


def snakemake(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    """Run snakemake; its messages (errors included) end up in .stdout."""
    return subprocess.run(["snakemake", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=hpcdl_env(**MULTINODE_MPI),
                          timeout=timeout, check=False)


def layer_file(results: Path, **overrides: object) -> Path:
    """The test's config layer over configs/smoke.yaml: results in tmp, no container."""
    layer = {"results_dir": str(results), "resources": {"container": None, "workers": 2,
                                                         "nodes": 2, "ranks_per_node": 1},
             "search": {"n_trials": 4}, "train": {"intra_op_threads": 1}}
    for key, value in overrides.items():
        layer[key] = {**layer.get(key, {}), **value} if isinstance(value, dict) else value
    path = results / "layer.yaml"
    path.write_text(yaml.safe_dump(layer))
    return path


def slurm_profile(*configfiles: Path) -> list[str]:
    return ["--profile", "profiles/slurm", "--workflow-profile", "tests/cluster/profile",
            "--configfile", "configs/smoke.yaml", *map(str, configfiles)]


def test_dry_run_with_the_cluster_down(tmp_path: Path) -> None:
    # this module installs and starts the cluster only after this test
    if shutil.which("sinfo"):
        assert subprocess.run(["sinfo"], capture_output=True, check=False).returncode != 0
    result = snakemake("-n", *slurm_profile(layer_file(tmp_path)))
    assert result.returncode == 0, result.stdout[-3000:]
    for line in ("sweep_config        1", "prepare             1", "worker              2",
                 "aggregate           1", "final               1", "report              1"):
        assert line in result.stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    up = subprocess.run(["bash", str(CLUSTER / "slurm-up.sh")], capture_output=True, text=True,
                        timeout=600, check=False)
    assert up.returncode == 0, up.stderr
    yield
    subprocess.run(["bash", str(CLUSTER / "slurm-down.sh")], capture_output=True, timeout=120,
                   check=False)


def finished(cfg: config.Config) -> list[optuna.trial.FrozenTrial]:
    s = optuna.load_study(study_name=cfg.name, storage=study.open_storage(cfg))
    return [t for t in s.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_snakemake_sweep_on_slurm_survives_a_cancelled_worker(cluster: None,
                                                               results: Path) -> None:
    """2 workers of 2 ranks (one per node) via srun --mpi=pmix; one worker job is cancelled
    mid-sweep, as a preemption or a lost node would, and Snakemake's retry finishes it."""
    layer = layer_file(results)
    run = subprocess.Popen(["snakemake", *slurm_profile(layer)], cwd=REPO, text=True,
                           env=hpcdl_env(**MULTINODE_MPI), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not list((results / "smoke" / "trials").glob("*.h5.ckpt/epoch-*")):
        assert time.monotonic() < deadline and run.poll() is None, "no trial started"
        time.sleep(0.1)
    queue = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    workers = [line.split()[0] for line in queue if "worker" in line]
    assert workers, queue
    subprocess.run(["scancel", workers[0]], check=True)
    output, _ = run.communicate(timeout=1500)
    assert run.returncode == 0, output[-4000:]
    assert "Trying to restart job" in output, output[-3000:]

    cfg = config.load(REPO / "configs" / "smoke.yaml", [f"results_dir={results}"])
    for name in ("report.html", "summary.h5", "summary.csv", "best/model.keras", "best/run.h5",
                 "scaling.h5", "workers/0.done", "workers/1.done", "config.yaml",
                 "benchmarks/worker-0.tsv", "logs/worker-1.log"):
        assert (cfg.sweep_dir / name).exists(), name
    assert len(finished(cfg)) == 4
    for trial in finished(cfg):  # each worker's 2 ranks ran on the 2 nodes
        assert sorted(store.read_run(cfg.trial_file(trial.number)).attrs["hosts"]) == [
            "n1", "n2"]


def test_hpcdl_submit_on_slurm(cluster: None, results: Path) -> None:
    sweep = results / "sub.yaml"
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(name="submitted", results_dir=str(results))
    document["search"]["n_trials"] = 3
    document["train"]["intra_op_threads"] = 1
    document["resources"] = {"workers": 2, "nodes": 1, "ranks_per_node": 2}
    sweep.write_text(yaml.safe_dump(document))
    result = run_hpcdl("submit", "--config", str(sweep), **MULTINODE_MPI)
    assert result.returncode == 0, result.stderr
    ids = dict(line.split(": ") for line in result.stdout.split("\n") if ": " in line)
    assert set(ids) == {"workers", "report"}  # the dataset file exists: no prepare job
    report = results / "submitted" / "report.html"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                               check=True).stdout.split()
        if not queue:
            break
        time.sleep(1)
    assert report.is_file(), list((results / "submitted" / "logs").glob("*"))
    cfg = config.load(sweep)
    assert len(finished(cfg)) == 3
    state = subprocess.run(["scontrol", "show", "job", ids["report"]], capture_output=True,
                           text=True, check=False).stdout
    assert "Dependency" in state or "COMPLETED" in state


def test_unknown_partition_reaches_the_user(cluster: None, results: Path) -> None:
    sweep = results / "bad.yaml"
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(results_dir=str(results), resources={"partition": "nosuchpart"})
    sweep.write_text(yaml.safe_dump(document))
    result = run_hpcdl("submit", "--config", str(sweep))
    assert result.returncode == 2
    assert "sbatch workers.sbatch" in result.stderr and "invalid partition" in (
        result.stderr.lower())


# ---------------------------------------------------------------- bad input, nothing submitted


def test_schema_error_names_the_key(tmp_path: Path) -> None:
    layer = layer_file(tmp_path, search={"n_trials": 0})
    result = snakemake("-n", *slurm_profile(layer))
    assert result.returncode != 0
    assert "n_trials" in result.stdout and "minimum" in result.stdout


def test_missing_configfile(tmp_path: Path) -> None:
    result = snakemake("-n", *slurm_profile(tmp_path / "nope.yaml"))
    assert result.returncode != 0 and "nope.yaml" in result.stdout


def test_workers_below_one(tmp_path: Path) -> None:
    result = snakemake("-n", *slurm_profile(layer_file(tmp_path, resources={"workers": 0})))
    assert result.returncode != 0 and "workers" in result.stdout


def test_more_ranks_than_gpus(tmp_path: Path) -> None:
    layer = layer_file(tmp_path, resources={"gpus_per_node": 2, "ranks_per_node": 4})
    result = snakemake("-n", *slurm_profile(layer))
    assert result.returncode != 0
    assert "ranks_per_node: 4 ranks per node but only 2 GPUs per node" in result.stdout


def test_missing_container_with_apptainer(tmp_path: Path) -> None:
    layer = layer_file(tmp_path, resources={"container": str(tmp_path / "none.sif")})
    result = snakemake("-n", "--profile", "profiles/slurm", "--configfile", "configs/smoke.yaml",
                       str(layer))
    assert result.returncode != 0
    assert f"resources.container: {tmp_path / 'none.sif'} does not exist" in result.stdout
