"""`hpcdl worker`: several 2-rank Open MPI workers share one study and one budget, survive
kill -9 and SIGTERM, prune in step, on journal, SQLite, gRPC-proxy and PostgreSQL storages."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import hpcdl_env, start_worker, write_sweep_config
from hpcdl import config, store, study

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    journal = results / "sweep" / "study.journal"
    assert journal.is_file()  # the proxy wrote through to the sweep's journal


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 in its own data directory, stopped afterwards."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed (make setup installs Debian's postgresql)")
    bin_dir = bins[-1]
    # pytest's tmp dirs are private to root; the server runs as the postgres user
    base = Path(tempfile.mkdtemp(prefix="hpcdl-pg-"))
    shutil.chown(base, "postgres")
    data, port = base / "data", free_port()

    def as_postgres(*command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True,
                       capture_output=True, timeout=120)

    as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start",
                "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1")
    try:
        as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "hpcdl")
        yield f"postgresql://postgres@127.0.0.1:{port}/hpcdl"
    finally:
        as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_storage_with_optuna_heartbeat(results: Path, postgres: str) -> None:
    cfg = write_sweep_config(results, storage=postgres, search={
        "n_trials": 4, "heartbeat_s": 1, "stale_after_s": 4}, train={"epochs": 2})
    two_workers(cfg, results)


def test_rdb_kill_9_uses_optuna_heartbeat_and_retry(results: Path) -> None:
    cfg = write_sweep_config(results, storage=f"sqlite:///{results}/study.db", search={
        "n_trials": 2, "heartbeat_s": 1, "stale_after_s": 3}, train={"batch_size": 8})
    victim = start_worker(cfg, 0)
    wait_for(lambda: first_checkpoint(results, "sweep") is not None, what="a checkpoint")
    kill_job(victim)
    time.sleep(4)  # past the grace period: Optuna's heartbeat now calls the trial stale
    rescuer = start_worker(cfg, 1, log=results / "rescuer.log")
    assert rescuer.wait(timeout=600) == 0, (results / "rescuer.log").read_text()[-3000:]
    trials = check_finished_sweep(cfg, 2)
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
    assert any(t.system_attrs.get("failed_trial") is not None for t in trials)


def test_unopenable_storage_is_one_clear_error_on_every_rank(results: Path) -> None:
    port = free_port()  # nothing listens there
    cfg = write_sweep_config(results, storage=f"postgresql://nobody@127.0.0.1:{port}/none")
    worker = start_worker(cfg, 0, log=results / "w.log")
    assert worker.wait(timeout=120) == 2
    log = (results / "w.log").read_text()
    assert f"storage: cannot open 'postgresql://nobody@127.0.0.1:{port}/none'" in log
    assert "Connection refused" in log and "Traceback" not in log


def test_missing_dataset_is_one_error_before_any_trial(results: Path) -> None:
    cfg = write_sweep_config(results)
    (results / "data" / "digits.h5").unlink()
    worker = start_worker(cfg, 0, log=results / "w.log")
    assert worker.wait(timeout=120) == 2
    log = (results / "w.log").read_text()
    assert "digits.h5: dataset file does not exist (run `hpcdl prepare`)" in log
    assert "Traceback" not in log and not (results / "sweep" / "study.journal").exists()


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
