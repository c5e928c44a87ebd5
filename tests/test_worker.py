"""`hpcdl worker`: several 2-rank Open MPI workers share one study and one budget, survive
kill -9, SIGTERM and SIGUSR1, prune in step, on journal, SQLite, gRPC-proxy, PostgreSQL and
MariaDB storages."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import free_port, hpcdl_env, run_hpcdl, run_mpi, start_worker, write_sweep_config
from hpcdl import config, liveness, store, study

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

STATE_OF_REASON = {"completed": TrialState.COMPLETE, "early-stopped": TrialState.COMPLETE,
                   "pruned": TrialState.PRUNED}


def load(cfg_path: Path) -> tuple[config.Config, optuna.Study]:
    cfg = config.load(cfg_path)
    return cfg, optuna.load_study(study_name=cfg.name, storage=study.open_storage(cfg))


def wait_all(workers: list[subprocess.Popen[str]], timeout: float = 600) -> list[int]:
    return [w.wait(timeout=timeout) for w in workers]


def check_finished_sweep(cfg_path: Path, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly n_trials finished, numbers unique, every trial file agrees with the study."""
    cfg, s = load(cfg_path)
    trials = s.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials, [(t.number, t.state, t.system_attrs) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in finished:
        run = store.read_run(cfg.trial_file(t.number))
        assert run.attrs["trial_number"] == t.number and run.attrs["ranks"] == 2
        assert STATE_OF_REASON[run.attrs["stop_reason"]] == t.state
        assert t.user_attrs["hpcdl:trial_file"] == str(cfg.trial_file(t.number))
        assert len(set(run.attrs["weights_sha256"])) == 1
        if t.state == TrialState.COMPLETE:
            assert t.value == max(run.epochs["val_accuracy"])
            assert run.attrs["params"]["seed"] == study.trial_seed(
                0, t.system_attrs.get("failed_trial", t.number))
    return trials


def wait_for(predicate, timeout: float = 300, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def kill_job(job: subprocess.Popen[str]) -> None:
    """SIGKILL mpirun and all its ranks at once, like a lost node. Open MPI gives every rank a
    process group of its own, so killing mpirun's group left the ranks running on for a while
    (long enough to finish a trial and start the next)."""

    def alive_in_session() -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process is gone
                continue
            if int(fields[3]) == job.pid and fields[0] != "Z":  # session, state
                pids.append(int(stat.parent.name))
        return pids

    for pid in alive_in_session():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    wait_for(lambda: not alive_in_session(), timeout=30, what="the killed job's ranks to exit")


def first_checkpoint(results: Path, name: str) -> Path | None:
    found = sorted((results / name / "trials").glob("*.h5.ckpt/epoch-*"))
    return found[0] if found else None


def test_three_workers_share_one_budget(results: Path) -> None:
    cfg = write_sweep_config(results, search={"n_trials": 9})
    workers = [start_worker(cfg, i, log=results / f"w{i}.log") for i in range(3)]
    assert wait_all(workers) == [0, 0, 0], [(results / f"w{i}.log").read_text()[-2000:]
                                            for i in range(3)]
    trials = check_finished_sweep(cfg, 9)
    assert {t.system_attrs["hpcdl:worker_id"] for t in trials} == {0, 1, 2}


def test_kill_9_then_a_new_worker_recovers(results: Path) -> None:
    # slow epochs (batch 8) so the kill lands inside a trial, after its first checkpoint
    cfg = write_sweep_config(results, search={"n_trials": 3}, train={"batch_size": 8})
    victim = start_worker(cfg, 0, log=results / "victim.log")
    wait_for(lambda: first_checkpoint(results, "sweep") is not None, what="a checkpoint")
    kill_job(victim)
    _, s = load(cfg)
    running = [t for t in s.get_trials() if t.state == TrialState.RUNNING]
    assert len(running) == 1
    lost = running[0]

    rescuer = start_worker(cfg, 1, log=results / "rescuer.log")
    assert rescuer.wait(timeout=600) == 0, (results / "rescuer.log").read_text()[-3000:]
    trials = check_finished_sweep(cfg, 3)
    failed = trials[lost.number]
    assert failed.state == TrialState.FAIL
    assert failed.system_attrs[study.FAIL_REASON].startswith("worker lost: owner pid")
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(rerun) == 1 and rerun[0].params == lost.params
    assert rerun[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    log = (results / "rescuer.log").read_text()
    assert f"trial {rerun[0].number} re-runs trial {lost.number} from its checkpoint" in log
    assert "resuming" in log
    run = store.read_run(config.load(cfg).trial_file(rerun[0].number))
    assert run.attrs["resumed_from_trial"] == lost.number


def test_sigterm_requeues_and_resumes(results: Path) -> None:
    cfg = write_sweep_config(results, search={"n_trials": 2}, train={"batch_size": 8})
    worker = start_worker(cfg, 0, log=results / "first.log")
    wait_for(lambda: first_checkpoint(results, "sweep") is not None, what="a checkpoint")
    ranks = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True,
                           check=True).stdout.split()
    for pid in ranks:  # what Slurm does at the time limit: signal every task
        os.kill(int(pid), signal.SIGTERM)
    assert worker.wait(timeout=120) == 75, (results / "first.log").read_text()[-3000:]
    _, s = load(cfg)
    interrupted = [t for t in s.get_trials() if t.state == TrialState.FAIL]
    assert len(interrupted) == 1
    assert interrupted[0].system_attrs[study.FAIL_REASON].startswith("interrupted")
    assert [t.state for t in s.get_trials()].count(TrialState.WAITING) == 1
    requeued = start_worker(cfg, 0, log=results / "second.log")
    assert requeued.wait(timeout=600) == 0, (results / "second.log").read_text()[-3000:]
    check_finished_sweep(cfg, 2)
    assert "from its checkpoint" in (results / "second.log").read_text()


def test_pruning_stops_all_ranks_at_the_same_epoch(results: Path) -> None:
    cfg = write_sweep_config(
        results, search={"n_trials": 3, "sampler": "random", "pruner": "median",
                         "pruner_startup_trials": 1, "pruner_warmup_epochs": 1,
                         "space": {"learning_rate": {"type": "categorical",
                                                     "choices": [0.003, 0.5]}}})
    s = study.open_study(config.load(cfg))
    for lr in (0.003, 0.5, 0.5):  # adam at lr 0.5 diverges to chance level
        s.enqueue_trial({"learning_rate": lr})
    worker = start_worker(cfg, 0, log=results / "w.log")
    assert worker.wait(timeout=600) == 0
    trials = check_finished_sweep(cfg, 3)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert [t.params["learning_rate"] for t in pruned] == [0.5, 0.5]
    log = (results / "w.log").read_text()
    for t in pruned:
        stops = re.findall(rf"\[rank (\d)/2@\S+\] INFO hpcdl.train: \S+/trials/{t.number}\.h5: "
                           r"pruned after (\d+) epochs", log)
        assert sorted(rank for rank, _ in stops) == ["0", "1"]
        assert len({epochs for _, epochs in stops}) == 1 and int(stops[0][1]) < 4


# ---------------------------------------------------------------- other storages


def two_workers(cfg: Path, results: Path) -> None:
    workers = [start_worker(cfg, i, log=results / f"w{i}.log") for i in range(2)]
    assert wait_all(workers) == [0, 0], [(results / f"w{i}.log").read_text()[-2000:]
                                         for i in range(2)]
    check_finished_sweep(cfg, 4)


def test_sqlite_storage(results: Path) -> None:
    cfg = write_sweep_config(results, storage=f"sqlite:///{results}/study.db",
                             search={"n_trials": 4}, train={"epochs": 2})
    two_workers(cfg, results)


def test_grpc_proxy_storage(results: Path) -> None:
    port = free_port()
    cfg = write_sweep_config(results, storage=f"grpc://127.0.0.1:{port}",
                             search={"n_trials": 4}, train={"epochs": 2})
    # started with SIGINT ignored, as a shell starts a background job (CI did): Ctrl-C / SIGINT
    # must still stop it
    server = subprocess.Popen(["hpcdl", "storage", "serve", "--config", str(cfg), "--host",
                               "127.0.0.1"], env=hpcdl_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 60, "gRPC proxy")
        two_workers(cfg, results)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        finally:
            server.kill()  # no proxy outlives the test, whatever happened
    assert server.returncode == 0, server.stdout.read()[-3000:] if server.stdout else ""
    # the proxy wrote through to the SQLite file in the sweep dir, never to a journal
    assert (results / "sweep" / "study.sqlite").is_file()
    assert not (results / "sweep" / "study.journal").exists()


def test_grpc_proxy_refuses_journal_unless_forced(results: Path) -> None:
    """Optuna's proxy does not support JournalStorage (optuna#6084): one line, exit 2."""
    cfg = write_sweep_config(results, storage="grpc://127.0.0.1:1")
    refused = run_hpcdl("storage", "serve", "--config", str(cfg), "--backend", "journal",
                        timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "optuna#6084" in refused.stderr and "--force-journal" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (results / "sweep" / "study.journal").exists()


def test_mysql_storage(results: Path, mariadb: str) -> None:
    assert mariadb.startswith("mysql://")  # the URL the README shows, not a driver's
    cfg = write_sweep_config(results, storage=mariadb, search={"n_trials": 4},
                             train={"epochs": 2})
    two_workers(cfg, results)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rdb_kill_9_is_failed_by_optuna_heartbeat_and_resumed(
        results: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{results}/study.db" if backend == "sqlite"
           else request.getfixturevalue("postgres"))
    name = f"kill9-{backend}"  # the PostgreSQL server is shared by the session's tests
    cfg = write_sweep_config(results, name=name, storage=url, search={
        "n_trials": 2, "heartbeat_s": 1, "stale_after_s": 3}, train={"batch_size": 8})
    victim = start_worker(cfg, 0, log=results / "victim.log")
    wait_for(lambda: first_checkpoint(results, name) is not None, what="a checkpoint")
    kill_job(victim)
    _, s = load(cfg)
    [lost] = s.get_trials(states=(TrialState.RUNNING,))
    assert liveness.HEARTBEAT not in lost.system_attrs  # Optuna's heartbeat, not hpcdl's
    # stale in Optuna's eyes once its last heartbeat is older than the grace period; a trial
    # that never had one would stay RUNNING for ever
    storage = s._storage
    wait_for(lambda: lost._trial_id in storage._get_stale_trial_ids(s._study_id), timeout=120,
             what="Optuna's heartbeat of the killed worker's trial to go stale")
    rescuer = start_worker(cfg, 1, log=results / "rescuer.log")
    assert rescuer.wait(timeout=600) == 0, (results / "rescuer.log").read_text()[-3000:]
    trials = check_finished_sweep(cfg, 2)
    assert trials[lost.number].state == TrialState.FAIL
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
    [rerun] = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert rerun.params == lost.params and rerun.system_attrs["hpcdl:worker_id"] == 1
    log = (results / "rescuer.log").read_text()
    assert f"trial {rerun.number} re-runs trial {lost.number} from its checkpoint" in log
    resumed = re.findall(rf"\[rank (\d)/2@\S+\] INFO hpcdl.train: resuming \S+/trials/"
                         rf"{rerun.number}\.h5 after epoch (\d+)", log)
    assert sorted(rank for rank, _ in resumed) == ["0", "1"], log[-3000:]
    assert len({epoch for _, epoch in resumed}) == 1 and int(resumed[0][1]) >= 1
    run = store.read_run(config.load(cfg).trial_file(rerun.number))
    assert run.attrs["resumed_from_trial"] == lost.number


def error_lines_per_rank(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """Each rank's output from its first `hpcdl worker: error:` line on, by rank
    (`mpirun --tag-output` prefixes every line a rank writes with [job,rank]<stream>:)."""
    found: dict[str, list[str]] = {"0": [], "1": []}
    for line in result.stderr.splitlines():
        tagged = re.match(r"\[\d+,(\d+)\]<stderr>:(.*)", line)
        if tagged and (found[tagged[1]] or tagged[2].startswith("hpcdl worker: error:")):
            found[tagged[1]].append(tagged[2])
    return found


def test_unopenable_storage_is_one_clear_error_on_every_rank(results: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://nobody@127.0.0.1:{port}/none"
    cfg = write_sweep_config(results, storage=url)
    result = run_mpi(2, "--tag-output", "hpcdl", "worker", "--config", str(cfg), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    line = (f"hpcdl worker: error: {cfg}: storage: cannot open '{url}': "
            f'(psycopg2.OperationalError) connection to server at "127.0.0.1", port {port} '
            "failed: Connection refused")
    assert error_lines_per_rank(result) == {"0": [line], "1": [line]}, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (results / "sweep").exists()


def test_missing_dataset_is_one_error_before_any_trial(results: Path) -> None:
    cfg = write_sweep_config(results)
    (results / "data" / "digits.h5").unlink()
    result = run_mpi(2, "--tag-output", "hpcdl", "worker", "--config", str(cfg), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    line = (f"hpcdl worker: error: {results}/data/digits.h5: dataset file does not exist "
            "(run `hpcdl prepare`)")
    assert error_lines_per_rank(result) == {"0": [line], "1": [line]}, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (results / "sweep").exists()


def test_diverging_trial_fails_and_the_worker_goes_on(results: Path) -> None:
    cfg = write_sweep_config(
        results, search={"n_trials": 2, "sampler": "random", "pruner": "none",
                         "space": {"learning_rate": {"type": "categorical",
                                                     "choices": [0.05, 1.0e9]}}},
        train={"optimizer": "sgd", "epochs": 2})
    s = study.open_study(config.load(cfg))
    for lr in (1.0e9, 0.05, 0.05):  # the first diverges to NaN at once
        s.enqueue_trial({"learning_rate": lr})
    worker = start_worker(cfg, 0, log=results / "w.log")
    assert worker.wait(timeout=600) == 0, (results / "w.log").read_text()[-3000:]
    trials = check_finished_sweep(cfg, 2)
    assert trials[0].state == TrialState.FAIL
    assert trials[0].system_attrs[study.FAIL_REASON] == "failed: non-finite loss"
    assert store.read_run(config.load(cfg).trial_file(0)).attrs["stop_reason"] == (
        "failed: non-finite loss")
    assert "Traceback" not in (results / "w.log").read_text()


def test_wall_clock_budget_stops_the_sweep(results: Path) -> None:
    cfg = write_sweep_config(results, search={"n_trials": 50, "timeout_min": 0.05})
    worker = start_worker(cfg, 0, log=results / "w.log")
    assert worker.wait(timeout=600) == 0
    _, s = load(cfg)
    assert 1 <= len(s.trials) < 50
    assert "wall-clock budget of 0.05 min spent" in (results / "w.log").read_text()


# ---------------------------------------------------------------- README promises


def test_raising_n_trials_continues_the_study(results: Path) -> None:
    cfg = write_sweep_config(results, search={"n_trials": 2}, train={"epochs": 2})
    first = start_worker(cfg, 0, log=results / "first.log")
    assert first.wait(timeout=600) == 0, (results / "first.log").read_text()[-3000:]
    before = check_finished_sweep(cfg, 2)
    cfg = write_sweep_config(results, search={"n_trials": 3}, train={"epochs": 2})
    again = start_worker(cfg, 0, log=results / "again.log")
    assert again.wait(timeout=600) == 0, (results / "again.log").read_text()[-3000:]
    after = check_finished_sweep(cfg, 3)
    assert [t.number for t in after] == [0, 1, 2] and after[:2] == before  # old trials kept
    started = re.findall(r"INFO hpcdl\.\w+: trial (\d+): \{", (results / "again.log").read_text())
    assert started == ["2"]


def test_gives_up_after_n_trials_failures(results: Path) -> None:
    cfg = write_sweep_config(
        results, search={"n_trials": 2, "sampler": "random", "pruner": "none",
                         "space": {"learning_rate": {"type": "categorical",
                                                     "choices": [1.0e9]}}},
        train={"optimizer": "sgd", "epochs": 2})  # every trial diverges to NaN at once
    worker = start_worker(cfg, 0, log=results / "w.log")
    # no trial completed: exit 1, so Snakemake stops before aggregate and report
    assert worker.wait(timeout=600) == 1, (results / "w.log").read_text()[-3000:]
    _, s = load(cfg)
    assert [(t.state, t.system_attrs[study.FAIL_REASON]) for t in s.get_trials()] == [
        (TrialState.FAIL, "failed: non-finite loss")] * 2
    log = (results / "w.log").read_text()
    assert "worker 0: no more trials (2 trials failed: giving up)" in log
    assert "worker 0: no trial of study 'sweep' completed; see `hpcdl status`" in log


def test_a_corrected_config_is_refused_then_continued_on_purpose(results: Path) -> None:
    """The issue's rerun: a first attempt whose every trial failed; the corrected config stops
    with one line and writes nothing; continued on purpose (HPCDL_CONTINUE_CHANGED=1, as
    Snakemake and sbatch pass it to the workers) it runs (old failures do not
    count) and the study records the change."""
    space = {"width": {"type": "int", "low": 16, "high": 64}}
    search = {"n_trials": 2, "sampler": "random", "pruner": "none", "space": space}
    cfg = write_sweep_config(results, search=search,
                             train={"optimizer": "sgd", "epochs": 1, "learning_rate": 1.0e9})
    first = start_worker(cfg, 0, log=results / "first.log")
    assert first.wait(timeout=600) == 1, (results / "first.log").read_text()[-3000:]
    cfg = write_sweep_config(results, search=search,
                             train={"optimizer": "sgd", "epochs": 1, "learning_rate": 0.05})
    refused = run_mpi(2, "--tag-output", "hpcdl", "worker", "--config", str(cfg), timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = (f"hpcdl worker: error: {cfg}: study 'sweep' in journal ran under another config; "
            "changed: train.learning_rate (1000000000.0 -> 0.05); its trials would not compare "
            "with new ones: give the sweep a new name, or continue this study on purpose with "
            "`hpcdl worker --continue-changed` (for the workers Snakemake or sbatch start: "
            "HPCDL_CONTINUE_CHANGED=1 in the environment)")
    assert error_lines_per_rank(refused) == {"0": [line], "1": [line]}, refused.stderr[-3000:]
    _, s = load(cfg)
    assert [t.state for t in s.get_trials()] == [TrialState.FAIL] * 2
    assert study.CONFIG_CHANGES not in s.user_attrs
    # as Snakemake's or sbatch's workers get it: from the environment
    again = run_mpi(2, "hpcdl", "worker", "--config", str(cfg), timeout=600,
                    HPCDL_CONTINUE_CHANGED="1")
    assert again.returncode == 0, again.stderr[-3000:]
    trials = check_finished_sweep(cfg, 2)
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    _, s = load(cfg)
    [change] = s.user_attrs[study.CONFIG_CHANGES]
    assert (change["changed"], change["from_trial"], change["continued_on_purpose"]) == (
        ["train.learning_rate"], 2, True)


def empty_val_split(dataset: Path) -> None:
    """Rewrite a dataset file's val split with no rows (as a file not from `hpcdl prepare`)."""
    import h5py

    with h5py.File(dataset, "r+") as f:
        sample = f["val/x"].shape[1:]
        del f["val"]
        f.create_dataset("val/x", shape=(0, *sample), dtype="uint8")
        f.create_dataset("val/y", shape=(0,), dtype="int64")


def relabel(dataset: Path, row: int, label: int) -> None:
    import h5py

    with h5py.File(dataset, "r+") as f:
        f["test/y"][row] = label


@pytest.mark.parametrize("problem", ["batch_size", "cnn_depth", "val_metric", "labels"])
def test_config_vs_dataset_problems_stop_before_the_study(results: Path, problem: str) -> None:
    """Checked once per sweep: exit 2, the same one line on every rank, nothing in the study."""
    from hpcdl import data

    dataset = results / "data" / "digits.h5"
    n_train = data.dataset_info(dataset).sizes["train"]
    sections: dict = {"batch_size": {"train": {"batch_size": 700}},
                      "cnn_depth": {"model": {"family": "cnn", "blocks": 4}}}.get(problem, {})
    cfg = write_sweep_config(results, **sections)
    if problem == "val_metric":
        empty_val_split(dataset)
    if problem == "labels":
        relabel(dataset, 7, 10)
    line = "hpcdl worker: error: " + {
        "batch_size": f"{dataset}: {n_train} training samples over 2 ranks is {n_train // 2} "
                      "per rank, fewer than one batch (train.batch_size 700); use fewer ranks "
                      "or a smaller batch",
        "cnn_depth": f"{cfg}: model: cnn too deep for 8x8 images: the max-pooling of block 4 "
                     "(layer block4_pool) would shrink a 1x1 feature map to nothing; use "
                     "blocks <= 3",
        "val_metric": f"{dataset}: the val split is empty, but search.metric val_accuracy needs "
                      "it; prepare the dataset with a val_fraction > 0 or optimise a train metric",
        "labels": f"{dataset}: /test/y[7] is 10, not a class index 0..9 (attribute n_classes "
                  "10)",
    }[problem]
    result = run_mpi(2, "--tag-output", "hpcdl", "worker", "--config", str(cfg), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines_per_rank(result) == {"0": [line], "1": [line]}, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (results / "sweep").exists()


def test_a_searched_batch_size_too_big_fails_only_its_trial(results: Path) -> None:
    cfg = write_sweep_config(
        results, search={"n_trials": 2, "sampler": "random", "pruner": "none",
                         "space": {"batch_size": {"type": "categorical", "choices": [700, 32]}}},
        train={"epochs": 1})
    s = study.open_study(config.load(cfg))
    for batch_size in (700, 32, 32):
        s.enqueue_trial({"batch_size": batch_size})
    worker = start_worker(cfg, 0, log=results / "w.log")
    assert worker.wait(timeout=600) == 0, (results / "w.log").read_text()[-3000:]
    trials = check_finished_sweep(cfg, 2)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "fewer than one batch (train.batch_size 700)" in trials[0].system_attrs[
        study.FAIL_REASON]


def test_surplus_trial_of_two_workers_racing_for_the_last_slot(results: Path,
                                                               postgres: str) -> None:
    """Both workers pass the budget check, then ask at the same moment: the test holds the
    study's row lock (which Optuna takes to number a new trial) until both wait for it."""
    import psycopg2

    cfg = write_sweep_config(results, name="race", storage=postgres, search={"n_trials": 1},
                             train={"epochs": 2})
    study.open_study(config.load(cfg))
    holder, watcher = psycopg2.connect(postgres), psycopg2.connect(postgres)
    watcher.autocommit = True  # pg_stat_activity is a snapshot per transaction
    # FOR NO KEY UPDATE blocks Optuna's FOR UPDATE of the study row (numbering a new trial) but
    # not the key-share lock that a write of a study attribute takes (the stale-sweep stamp
    # each worker writes before its budget check): a FOR UPDATE here would stop both workers
    # before the budget check, where no race is left to test
    holder.cursor().execute(
        "SELECT study_id FROM studies WHERE study_name = 'race' FOR NO KEY UPDATE")
    workers = [start_worker(cfg, i, log=results / f"w{i}.log") for i in range(2)]

    def both_wait_or_one_exited() -> bool:
        with watcher.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                           "'Lock' AND query LIKE '%FROM studies%FOR UPDATE%'")
            waiting = cursor.fetchone()[0]
        return waiting == 2 or any(w.poll() is not None for w in workers)

    try:
        try:
            wait_for(both_wait_or_one_exited, timeout=600, what="both workers to ask")
            assert [w.poll() for w in workers] == [None, None]
        finally:
            holder.commit()  # release: Optuna numbers the two new trials one after the other
            holder.close()
            watcher.close()
        assert wait_all(workers) == [0, 0], [(results / f"w{i}.log").read_text()[-2000:]
                                             for i in range(2)]
    finally:
        for worker in workers:
            if worker.poll() is None:
                kill_job(worker)
    trials = check_finished_sweep(cfg, 1)
    assert len(trials) == 2 and trials[0].state == TrialState.COMPLETE
    surplus = trials[1]
    assert surplus.state == TrialState.FAIL and surplus.system_attrs[study.SURPLUS] is True
    assert surplus.system_attrs[study.FAIL_REASON].startswith("surplus:")
    assert {t.system_attrs["hpcdl:worker_id"] for t in trials} == {0, 1}  # one trial each
    assert study.budget(trials, count_failed=True) == study.Budget(1, 1, 0)  # never counted
    assert not config.load(cfg).trial_file(1).exists()  # nothing trained


def test_sigusr1_to_one_rank_stops_every_rank_after_the_same_batch(results: Path) -> None:
    cfg = write_sweep_config(results, search={"n_trials": 1}, train={"batch_size": 8})
    worker = start_worker(cfg, 0, log=results / "w.log")
    wait_for(lambda: first_checkpoint(results, "sweep") is not None, what="a checkpoint")
    ranks = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True,
                           check=True).stdout.split()
    [rank_1] = [pid for pid in ranks if b"OMPI_COMM_WORLD_RANK=1\0" in
                Path(f"/proc/{pid}/environ").read_bytes()]
    os.kill(int(rank_1), signal.SIGUSR1)  # Slurm's --signal warning, seen by one rank only
    assert worker.wait(timeout=300) == 75, (results / "w.log").read_text()[-3000:]
    log = (results / "w.log").read_text()
    stops = re.findall(r"\[rank (\d)/2@\S+\] WARNING hpcdl.train: (.+?) received: "
                       r"stopping after (epoch \d+(?:'s unfinished batch)?)", log)
    assert len(stops) == 2 and stops[0][2] == stops[1][2], log[-3000:]  # same place
    assert sorted((rank, who) for rank, who, _ in stops) == [
        ("0", "stop from another rank"), ("1", "SIGUSR1")]
    assert "exited on signal" not in log  # every rank stopped itself, none was killed
    cfg_loaded, s = load(cfg)
    [interrupted] = s.get_trials(states=(TrialState.FAIL,))
    assert interrupted.system_attrs[study.FAIL_REASON].startswith("interrupted")
    assert len(s.get_trials(states=(TrialState.WAITING,))) == 1  # re-queued
    assert store.read_run(cfg_loaded.trial_file(0)).attrs["stop_reason"] == "interrupted"
    assert first_checkpoint(results, "sweep") is not None  # kept for the re-run


def sigterm_ranks(job: subprocess.Popen[str]) -> None:
    """What Slurm does at the time limit: signal every task."""
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True,
                           check=True).stdout.split()
    for pid in ranks:
        os.kill(int(pid), signal.SIGTERM)


def test_a_trial_interrupted_twice_resumes_from_its_latest_checkpoint(results: Path) -> None:
    """Each re-run adopts the checkpoint of the attempt before it, not the first attempt's
    (which the first re-run took over): a trial hitting the time limit twice loses no epoch."""
    cfg = write_sweep_config(results, search={"n_trials": 1},
                             train={"batch_size": 8, "epochs": 8})
    trials_dir = results / "sweep" / "trials"
    first = start_worker(cfg, 0, log=results / "first.log")
    wait_for(lambda: first_checkpoint(results, "sweep") is not None, what="a checkpoint")
    sigterm_ranks(first)
    assert first.wait(timeout=120) == 75, (results / "first.log").read_text()[-3000:]
    epochs_0 = store.read_run(trials_dir / "0.h5").n_epochs
    second = start_worker(cfg, 0, log=results / "second.log")
    wait_for(lambda: (trials_dir / "1.h5.ckpt" / f"epoch-{epochs_0 + 1:05d}").exists(),
             what="the first re-run to checkpoint an epoch of its own")
    sigterm_ranks(second)
    assert second.wait(timeout=120) == 75, (results / "second.log").read_text()[-3000:]
    epochs_1 = store.read_run(trials_dir / "1.h5").n_epochs
    assert epochs_1 > epochs_0
    third = start_worker(cfg, 0, log=results / "third.log")
    assert third.wait(timeout=600) == 0, (results / "third.log").read_text()[-3000:]
    log = (results / "third.log").read_text()
    assert "trial 2 re-runs trial 1 from its checkpoint" in log
    assert f"resuming {trials_dir}/2.h5 after epoch {epochs_1}" in log
    trials = check_finished_sweep(cfg, 1)  # also: trial 2 trained with trial 0's seed
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    run = store.read_run(trials_dir / "2.h5")
    assert run.attrs["resumed_from_trial"] == 1 and run.n_epochs == 8
