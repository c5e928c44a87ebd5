"""The workflow on a real Slurm cluster (two emulated nodes, started by tests/cluster/slurm-up.sh):
Snakemake with profiles/slurm, a worker job cancelled and retried, plain `hpcdl submit` with its
prepare job, dependencies and a USR1 -> exit 75 -> requeue, the dry run with the cluster down,
and bad input refused before any job is submitted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from conftest import REPO, hpcdl_env, run_hpcdl
from hpcdl import config, liveness, store, study

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CLUSTER = REPO / "tests" / "cluster"
# Open MPI between the two emulated nodes of one host: TCP on loopback (stack notes).
MULTINODE_MPI = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo",
                 "OMPI_MCA_oob_tcp_if_include": "lo"}
SLURMCTLD_PORT = 6817  # slurm-up.sh's SlurmctldPort
SLURM_BASE = Path(os.environ.get("HPCDL_SLURM_DIR", "/tmp/hpcdl-slurm"))  # slurm-up.sh's BASE
CLUSTER_UP_S = 600  # slurm-up.sh may install Slurm first
SWEEP_S = 1500  # one whole sweep on the loaded test machine
# pytest-timeout's global 900 s is for ordinary tests; a sweep test may also start the cluster
SWEEP_TEST_TIMEOUT = CLUSTER_UP_S + SWEEP_S + 300


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


def queue() -> list[str]:
    """The ids of every job Slurm still holds (pending or running)."""
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                          check=True, timeout=60).stdout.split()


def slurmctld_answers() -> bool:
    """Does a Slurm controller answer? False also where Slurm is not installed at all."""
    try:
        return subprocess.run(["squeue", "-h"], capture_output=True, timeout=60,
                              check=False).returncode == 0
    except FileNotFoundError:
        return False


def test_dry_run_with_the_cluster_down(tmp_path: Path) -> None:
    # this module installs and starts the cluster only after this test
    assert not slurmctld_answers(), "a Slurm controller is up: stop it (slurm-down.sh)"
    with pytest.raises(ConnectionRefusedError):  # nothing listens on slurmctld's port
        socket.create_connection(("127.0.0.1", SLURMCTLD_PORT), timeout=10).close()
    result = snakemake("-n", *slurm_profile(layer_file(tmp_path)))
    assert result.returncode == 0, result.stdout[-3000:]
    for line in ("sweep_config        1", "prepare             1", "worker              2",
                 "aggregate           1", "final               1", "report              1"):
        assert line in result.stdout


def dry_run_resources(output: str) -> dict[str, dict[str, str]]:
    """Each rule's `resources:` line of a dry run (the last job of a rule wins)."""
    found: dict[str, dict[str, str]] = {}
    for block in output.split("rule ")[1:]:
        rule = block.split(":", 1)[0]
        line = next((ln for ln in block.splitlines() if ln.strip().startswith("resources:")), "")
        found[rule] = dict(item.split("=", 1) for item in
                           line.split("resources:", 1)[-1].split(", ") if "=" in item)
    return found


def test_dry_run_shows_each_jobs_gpu_request(tmp_path: Path) -> None:
    """GPUs asked per node, each MPI job for its own node count (scaling: fewer nodes, so
    fewer GPUs); jobs that train nothing ask for none. The user sees it before submitting."""
    layer = layer_file(tmp_path, resources={"ranks_per_node": 2, "gpus_per_node": 2,
                                            "partition": "gpu"})
    result = snakemake("-n", *slurm_profile(layer))
    assert result.returncode == 0, result.stdout[-3000:]
    resources = dry_run_resources(result.stdout)
    for rule, nodes, tasks in (("worker", "2", "4"), ("final", "2", "4"), ("scaling", "1", "2")):
        asked = resources[rule]
        assert (asked["nodes"], asked["tasks"], asked["gres"]) == (nodes, tasks, "gpu:2"), rule
        assert "gpu" not in asked and asked["tasks_per_gpu"] == "0", rule  # no --gpus, per job
    for rule in ("prepare", "aggregate", "report"):
        assert not {"gres", "gpu", "gpus"} & set(resources[rule]), rule


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    up = subprocess.run(["bash", str(CLUSTER / "slurm-up.sh")], capture_output=True, text=True,
                        timeout=CLUSTER_UP_S, check=False)
    assert up.returncode == 0, up.stderr
    yield
    subprocess.run(["bash", str(CLUSTER / "slurm-down.sh")], capture_output=True, timeout=120,
                   check=False)
    # a stale gres.conf breaks the next slurmd whose slurm.conf has no GresTypes
    leftovers = [path for path in (Path("/etc/slurm/gres.conf"), SLURM_BASE / "dev")
                 if path.exists()]
    assert leftovers == [], "slurm-down.sh left these behind"


@pytest.fixture
def idle_cluster(cluster: None) -> Iterator[None]:
    """The cluster with an empty queue; whatever a test submitted is cancelled after it."""
    assert queue() == []
    yield
    subprocess.run(["scancel", "--full", "--quiet", "--user", str(os.getuid())], check=False)


def all_trials(cfg: config.Config) -> dict[int, FrozenTrial]:
    s = optuna.load_study(study_name=cfg.name, storage=study.open_storage(cfg))
    return {t.number: t for t in s.get_trials()}


def finished(cfg: config.Config) -> list[FrozenTrial]:
    return [t for t in all_trials(cfg).values()
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def trial_with_checkpoint(cfg: config.Config) -> FrozenTrial | None:
    """A running trial that has kept an epoch checkpoint, if any yet."""
    for checkpoint in sorted(cfg.paths.trials_dir.glob("*.h5.ckpt/epoch-*")):
        trial = all_trials(cfg).get(int(checkpoint.parent.name.split(".")[0]))
        if trial is not None and trial.state == TrialState.RUNNING:
            return trial
    return None


def check_rerun_from_checkpoint(cfg: config.Config, lost: FrozenTrial, reasons: tuple[str, ...],
                                logs: str) -> None:
    """The lost trial is FAILED for `reasons`, re-run exactly once with its params, from its
    checkpoint, and the re-run finished."""
    trials = all_trials(cfg)
    failed = trials[lost.number]
    assert failed.state == TrialState.FAIL, failed
    assert failed.system_attrs[study.FAIL_REASON].startswith(reasons), failed.system_attrs
    reruns = [t for t in trials.values() if t.system_attrs.get("failed_trial") == lost.number]
    assert len(reruns) == 1, [(t.number, t.state, t.system_attrs) for t in trials.values()]
    rerun = reruns[0]
    assert rerun.params == lost.params
    assert rerun.state in (TrialState.COMPLETE, TrialState.PRUNED), rerun
    assert store.read_run(cfg.trial_file(rerun.number)).attrs["resumed_from_trial"] == (
        lost.number)
    assert f"trial {rerun.number} re-runs trial {lost.number} from its checkpoint" in logs


def sweep_cancelling_one_worker(cfg: config.Config, layer: Path) -> tuple[str, FrozenTrial]:
    """Snakemake with profiles/slurm on `layer`; once a trial has an epoch checkpoint, its
    worker's Slurm job is cancelled, as a preemption or a lost node would. Snakemake's output
    (it succeeded, having retried that job) and the trial that was running."""
    run = subprocess.Popen(["snakemake", *slurm_profile(layer)], cwd=REPO, text=True,
                           env=hpcdl_env(**MULTINODE_MPI), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SWEEP_S
        while (victim := trial_with_checkpoint(cfg)) is None:
            assert time.monotonic() < deadline and run.poll() is None, "no trial checkpointed"
            time.sleep(0.5)
        job = victim.system_attrs[liveness.JOB]  # the Slurm job of the worker running it
        assert job in queue(), (job, queue())
        subprocess.run(["scancel", job], check=True)
        output, _ = run.communicate(timeout=deadline - time.monotonic())
    finally:
        run.kill()  # if it is still running; its jobs go with idle_cluster
    assert run.returncode == 0, output[-4000:]
    assert "Trying to restart job" in output, output[-3000:]
    # scancel: SIGTERM to every rank (they mark the trial interrupted), or a worker lost
    logs = "".join(p.read_text() for p in cfg.paths.logs_dir.glob("worker-*.log"))
    check_rerun_from_checkpoint(cfg, victim, ("interrupted", "worker lost"), logs)
    return output, victim


@pytest.mark.timeout(SWEEP_TEST_TIMEOUT)
def test_snakemake_sweep_on_slurm_survives_a_cancelled_worker(idle_cluster: None,
                                                               results: Path) -> None:
    """2 workers of 2 ranks (one per node) via srun --mpi=pmix on the CPU-only partition; one
    worker job is cancelled mid-trial and Snakemake's retry finishes it."""
    # slow epochs (batch 8), no pruning: the cancel lands inside a trial, after a checkpoint
    layer = layer_file(results, train={"batch_size": 8}, search={"pruner": "none"})
    cfg = config.load(REPO / "configs" / "smoke.yaml", [f"results_dir={results}"])
    sweep_cancelling_one_worker(cfg, layer)
    for name in ("report.html", "summary.h5", "summary.csv", "best/model.keras", "best/run.h5",
                 "scaling.h5", "workers/0.done", "workers/1.done", "config.yaml",
                 "benchmarks/worker-0.tsv", "logs/worker-1.log"):
        assert (cfg.sweep_dir / name).exists(), name
    assert len(finished(cfg)) == 4
    for trial in finished(cfg):  # each worker's 2 ranks ran on the 2 nodes
        assert sorted(store.read_run(cfg.trial_file(trial.number)).attrs["hosts"]) == [
            "n1", "n2"]


def job_records(job: str | None = None) -> dict[str, dict[str, str]]:
    """`scontrol show job` for a job (an array: each of its tasks), or every job Slurm still
    knows, by <id> or <array>_<task>; empty once Slurm has forgotten it (MinJobAge)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", *([job] if job else [])],
                           capture_output=True, text=True, check=False, timeout=60)
    records = {}
    for line in shown.stdout.splitlines() if shown.returncode == 0 else []:
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        task = fields.get("ArrayTaskId", "")
        key = f"{fields['ArrayJobId']}_{task}" if task.isdigit() else fields["JobId"]
        records[key] = fields
    return records


def when(record: dict[str, str], field: str) -> datetime:
    return datetime.fromisoformat(record[field])


@pytest.mark.timeout(SWEEP_TEST_TIMEOUT)
def test_hpcdl_submit_prepares_requeues_and_reports(idle_cluster: None, tmp_path: Path) -> None:
    """No dataset file yet: prepare -> workers (afterok) -> report (afterany). One array task
    gets USR1 mid-trial, as Slurm sends it before the time limit: the trap passes it to the
    ranks, they exit 75, the job is requeued, and the trial resumes from its checkpoint."""
    sweep = tmp_path / "sub.yaml"
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(name="submitted", results_dir=str(tmp_path))
    document["search"].update(n_trials=3, pruner="none")
    # slow epochs (batch 2: ~2 s each on an idle 2-core machine, 6 of them), so that the signal,
    # sent once a trial has its first checkpoint, lands with epochs still to run: at batch 8 a
    # whole trial took 2-5 s and the signal could arrive after it had ended
    document["train"].update(intra_op_threads=1, batch_size=2, epochs=6)
    document["resources"] = {"workers": 2, "nodes": 1, "ranks_per_node": 2}
    sweep.write_text(yaml.safe_dump(document))
    cfg = config.load(sweep)
    assert not cfg.dataset_file.exists()
    result = run_hpcdl("submit", "--config", str(sweep), **MULTINODE_MPI)
    assert result.returncode == 0, result.stderr
    ids = dict(line.split(": ") for line in result.stdout.splitlines())
    assert list(ids) == ["prepare", "workers", "report"]
    # right after submission (prepare takes seconds, the array minutes); once fulfilled,
    # Slurm shows (null), so the start and end times below check the order as well
    assert {r["Dependency"] for r in job_records(ids["workers"]).values()} == {
        f"afterok:{ids['prepare']}(unfulfilled)"}
    assert {r["Dependency"] for r in job_records(ids["report"]).values()} == {
        f"afterany:{ids['workers']}_*(unfulfilled)"}

    seen: dict[str, dict[str, str]] = {}  # last record of every job, kept past MinJobAge
    victim: FrozenTrial | None = None
    deadline = time.monotonic() + SWEEP_S
    while True:
        assert time.monotonic() < deadline, seen
        active = queue()
        for job in ids.values():
            seen.update(job_records(job))
        if not active:
            break
        if victim is None and (victim := trial_with_checkpoint(cfg)) is not None:
            subprocess.run(["scancel", "--signal=USR1", "--batch",
                            victim.system_attrs[liveness.JOB]], check=True)
        time.sleep(1)

    tasks = [f"{ids['workers']}_{i}" for i in (0, 1)]
    assert {job: seen[job]["JobState"] for job in (ids["prepare"], *tasks, ids["report"])} == {
        job: "COMPLETED" for job in (ids["prepare"], *tasks, ids["report"])}
    for task in tasks:  # the dependencies held: prepare < both array tasks < report
        assert when(seen[ids["prepare"]], "EndTime") <= when(seen[task], "StartTime")
        assert when(seen[task], "EndTime") <= when(seen[ids["report"]], "StartTime")
    assert victim is not None, "no trial reached a checkpoint"
    assert int(seen[victim.system_attrs[liveness.JOB]]["Restarts"]) == 1
    assert cfg.paths.report_html.is_file(), list(cfg.paths.logs_dir.glob("*"))
    assert len(finished(cfg)) == 3
    # one log per job, named by its job id (array tasks: <array>_<task>); the requeued task's
    # two runs append to one
    assert sorted(p.name for p in cfg.paths.logs_dir.glob("slurm-*.out")) == sorted(
        [f"slurm-prepare-{ids['prepare']}.out", f"slurm-report-{ids['report']}.out",
         *(f"slurm-workers-{task}.out" for task in tasks)])
    logs = "".join(p.read_text() for p in cfg.paths.logs_dir.glob("slurm-workers-*.out"))
    check_rerun_from_checkpoint(cfg, victim, ("interrupted",), logs)


# ---------------------------------------------------------------- GPU nodes (emulated GRES)

# the GPU partition of slurm-up.sh: n3, n4, 2 emulated GPUs each; one rank per GPU
GPU_RESOURCES = {"partition": "gpu", "nodes": 2, "ranks_per_node": 2, "gpus_per_node": 2,
                 "workers": 1}
GPU_HOSTS = {"n3", "n4"}


def check_one_rank_per_gpu(run_file: Path) -> None:
    """Slurm gave every rank GPUs and the ranks pinned 4 distinct (host, GPU) pairs."""
    placement = store.read_run(run_file).attrs["placement"]
    assert [p["rank"] for p in placement] == [0, 1, 2, 3], placement
    assert all(p["slurm_gpus"] and p["cuda_visible_devices"] for p in placement), placement
    assert {(p["host"], p["gpu"]) for p in placement} == {
        (host, gpu) for host in GPU_HOSTS for gpu in ("0", "1")}, placement


def gpu_requests(rule_jobs: dict[str, dict[str, str]]) -> dict[str, tuple[str, str, str]]:
    """(nodes, tasks, GPUs per node) as Slurm recorded each job's request."""
    return {name: (job["NumNodes"], job["NumTasks"], job.get("TresPerNode", ""))
            for name, job in rule_jobs.items()}


@pytest.mark.timeout(SWEEP_TEST_TIMEOUT)
def test_snakemake_gpu_sweep_one_rank_per_gpu(idle_cluster: None, results: Path) -> None:
    """The smoke sweep on the GPU nodes, 2 nodes x 2 ranks x 2 GPUs, through the Snakemake
    profile: every job that trains asks GPUs per node for its own nodes (the scaling job on
    one node was refused when it asked for the workers' 4), every rank drives its own GPU, and
    the worker job cancelled mid-trial is retried on GPUs and resumes the trial."""
    # slow epochs (batch 8), no pruning: the cancel lands inside a trial, after a checkpoint
    layer = layer_file(results, resources={**GPU_RESOURCES, "scaling_epochs": 2},
                       search={"n_trials": 2, "pruner": "none"},
                       train={"epochs": 3, "batch_size": 8})
    cfg = config.load(REPO / "configs" / "smoke.yaml", [f"results_dir={results}"])
    sweep_cancelling_one_worker(cfg, layer)
    for name in ("report.html", "best/model.keras", "scaling.h5"):
        assert (cfg.sweep_dir / name).exists(), name
    assert len(finished(cfg)) == 2
    for trial in finished(cfg):
        check_one_rank_per_gpu(cfg.trial_file(trial.number))
    check_one_rank_per_gpu(cfg.paths.best_run)
    assert store.read_scaling(cfg.paths.scaling_h5)["ranks"].tolist() == [1, 2]
    best = store.read_run(cfg.trial_file(study.best_trial(cfg).number))
    assert (f"Where its ranks ran (rank host:GPU): {store.placement_text(best.attrs['placement'])}"
            in cfg.paths.report_html.read_text())
    jobs = {fields.get("Comment", "").split("_wildcards")[0].removeprefix("rule_"): fields
            for fields in job_records().values() if fields.get("Partition") == "gpu"}
    assert gpu_requests({rule: jobs[rule] for rule in ("worker", "final", "scaling")}) == {
        "worker": ("2", "4", "gres:gpu:2"), "final": ("2", "4", "gres:gpu:2"),
        "scaling": ("1", "2", "gres:gpu:2")}
    for rule in ("prepare", "aggregate", "report"):
        assert "gpu" not in jobs.get(rule, {}).get("TresPerNode", ""), rule


@pytest.mark.timeout(SWEEP_TEST_TIMEOUT)
def test_hpcdl_submit_gpu_sweep_one_rank_per_gpu(idle_cluster: None, results: Path) -> None:
    sweep = results / "gpusub.yaml"
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(name="gpusub", results_dir=str(results), resources=GPU_RESOURCES)
    document["search"].update(n_trials=2)
    document["train"].update(intra_op_threads=1, epochs=2)
    sweep.write_text(yaml.safe_dump(document))
    cfg = config.load(sweep)
    result = run_hpcdl("submit", "--config", str(sweep), **MULTINODE_MPI)
    assert result.returncode == 0, result.stderr
    ids = dict(line.split(": ") for line in result.stdout.splitlines())
    assert list(ids) == ["workers", "report"]  # the dataset file is there
    seen: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + SWEEP_S
    while queue():
        assert time.monotonic() < deadline, seen
        for job in ids.values():
            seen.update(job_records(job))
        time.sleep(1)
    for job in ids.values():
        seen.update(job_records(job))
    assert gpu_requests({"workers": seen[f"{ids['workers']}_0"], "report": seen[ids["report"]]}
                        ) == {"workers": ("2", "4", "gres:gpu:2"),
                              "report": ("2", "4", "gres:gpu:2")}
    assert {seen[job]["JobState"] for job in (f"{ids['workers']}_0", ids["report"])} == {
        "COMPLETED"}, list(cfg.paths.logs_dir.glob("*"))
    assert cfg.paths.report_html.is_file()
    assert len(finished(cfg)) == 2
    for trial in finished(cfg):
        check_one_rank_per_gpu(cfg.trial_file(trial.number))
    check_one_rank_per_gpu(cfg.paths.best_run)


def test_unknown_partition_reaches_the_user(idle_cluster: None, results: Path) -> None:
    sweep = results / "bad.yaml"
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(results_dir=str(results), resources={"partition": "nosuchpart"})
    sweep.write_text(yaml.safe_dump(document))
    result = run_hpcdl("submit", "--config", str(sweep))
    assert result.returncode == 2
    script = config.load(sweep).paths.sbatch_script("workers")
    assert result.stderr.splitlines() == [
        f"hpcdl submit: error: sbatch workers.sbatch ({script}) failed: "
        "sbatch: error: invalid partition specified: nosuchpart; "
        "sbatch: error: Batch job submission failed: Invalid partition name specified"]
    assert queue() == []


# ---------------------------------------------------------------- bad input, nothing submitted


def refused(*args: str) -> tuple[int | None, list[str], list[str]]:
    """Snakemake for real (not -n) on bad input: its exit code (None if it still ran after
    120 s, i.e. it went ahead), its output lines, and the Slurm queue when it stopped."""
    with subprocess.Popen(["snakemake", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=hpcdl_env(**MULTINODE_MPI),
                          start_new_session=True) as run:
        try:
            output, _ = run.communicate(timeout=120)
            code: int | None = run.returncode
        except subprocess.TimeoutExpired:
            jobs = queue()
            os.killpg(run.pid, signal.SIGKILL)
            return None, run.communicate()[0].splitlines(), jobs
        return code, output.splitlines(), queue()


def check_one_line(outcome: tuple[int | None, list[str], list[str]], line: str) -> None:
    """Exit 2, the one line that names file, key, value and what was expected; no job."""
    code, lines, jobs = outcome
    assert (code, jobs) == (2, []), lines[-20:]
    # snakemake prints only the profile it uses besides hpcdl's line
    assert [ln for ln in lines if not ln.startswith("Using ")] == [line]


def test_schema_error_names_the_layer_file_and_key(idle_cluster: None, tmp_path: Path) -> None:
    layer = layer_file(tmp_path, search={"n_trials": 0})  # smoke.yaml sets 6, the layer 0
    check_one_line(refused(*slurm_profile(layer)),
                   f"{layer}: search.n_trials: 0 is less than the minimum of 1")
    # the same one line from `hpcdl submit` on a single file
    sweep = tmp_path / "sweep.yaml"
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(results_dir=str(tmp_path), search={**document["search"], "n_trials": 0})
    sweep.write_text(yaml.safe_dump(document))
    result = run_hpcdl("submit", "--config", str(sweep))
    assert (result.returncode, result.stderr.splitlines()) == (
        2, [f"hpcdl submit: error: {sweep}: search.n_trials: 0 is less than the minimum of 1"])
    assert queue() == [] and not (tmp_path / "smoke").exists()


def test_a_key_set_only_in_the_first_configfile_names_that_file(idle_cluster: None,
                                                                tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document["search"]["sampler"] = "annealing"
    first.write_text(yaml.safe_dump(document))
    layer = layer_file(tmp_path)
    check_one_line(refused("--profile", "profiles/slurm", "--workflow-profile",
                           "tests/cluster/profile", "--configfile", str(first), str(layer)),
                   f"{first}: search.sampler: 'annealing' is not one of "
                   "['tpe', 'random', 'grid', 'cmaes', 'qmc']")


def test_missing_configfile(idle_cluster: None, tmp_path: Path) -> None:
    # Snakemake reads --configfile files before the Snakefile runs: its own error, exit 1
    code, lines, jobs = refused(*slurm_profile(tmp_path / "nope.yaml"))
    assert (code, jobs) == (1, [])
    assert (f"FileNotFoundError: [Errno 2] No such file or directory: "
            f"'{tmp_path / 'nope.yaml'}'") in lines


def test_workers_below_one(idle_cluster: None, tmp_path: Path) -> None:
    layer = layer_file(tmp_path, resources={"workers": 0})
    check_one_line(refused(*slurm_profile(layer)),
                   f"{layer}: resources.workers: 0 is less than the minimum of 1")


def test_more_ranks_than_gpus(idle_cluster: None, tmp_path: Path) -> None:
    layer = layer_file(tmp_path, resources={"gpus_per_node": 2, "ranks_per_node": 4})
    check_one_line(refused(*slurm_profile(layer)),
                   f"{layer}: resources.ranks_per_node: 4 ranks per node but only 2 GPUs per "
                   "node; one rank drives one GPU")


def test_missing_container_with_apptainer(idle_cluster: None, tmp_path: Path) -> None:
    image = tmp_path / "none.sif"
    layer = layer_file(tmp_path, resources={"container": str(image)})
    check_one_line(refused("--profile", "profiles/slurm", "--configfile", "configs/smoke.yaml",
                           str(layer)),
                   f"{layer}: resources.container: {image} does not exist (build it with: "
                   "apptainer build hpcdl.sif containers/hpcdl.def)")


@pytest.mark.parametrize(("resources", "partition_has"), [
    ({"partition": "gpu", "gpus_per_node": 4, "ranks_per_node": 1},
     "partition 'gpu' have at most 2 per node"),
    ({"gpus_per_node": 1, "ranks_per_node": 1}, "the default partition have no GPUs"),
])
def test_more_gpus_per_node_than_the_partition_has(idle_cluster: None, tmp_path: Path,
                                                   resources: dict, partition_has: str) -> None:
    """Slurm would leave such a job pending for ever (or refuse it after the first jobs ran):
    sinfo is asked first, and the one line says what the partition has."""
    layer = layer_file(tmp_path, resources=resources)
    asked = resources["gpus_per_node"]
    check_one_line(refused(*slurm_profile(layer)),
                   f"{layer}: resources.gpus_per_node: {asked} GPUs per node asked, but the "
                   f"nodes of {partition_has} (sinfo)")
    sweep = tmp_path / "sweep.yaml"  # the same line from `hpcdl submit` and its dry run
    document = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    document.update(results_dir=str(tmp_path), resources=resources)
    sweep.write_text(yaml.safe_dump(document))
    for dry_run in ([], ["--dry-run"]):
        result = run_hpcdl("submit", "--config", str(sweep), *dry_run)
        assert (result.returncode, result.stderr.splitlines()) == (2, [
            f"hpcdl submit: error: {sweep}: resources.gpus_per_node: {asked} GPUs per node "
            f"asked, but the nodes of {partition_has} (sinfo)"])
    assert queue() == [] and not (tmp_path / "smoke").exists()
