"""Many workers on one study, as real processes on real storages (journal, SQLite, the gRPC
proxy), after the storage calls per trial were cut (issue 21): the budget is neither
double-counted nor overshot, a dead worker's trial is still recovered with the stale sweep on
a study-wide period, and prune decisions through the proxy's listing cache are not stale.

The processes run worker.Worker's rank-0 code (next_plan, decide_prune, the heartbeat,
_tell_result) with a sleep for training: no TensorFlow or MPI, so a test takes seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import free_port, hpcdl_env, write_sweep_config
from hpcdl import config, study

# argv: config, worker id, seconds per epoch, metric per epoch
RANK0 = """
import socket, sys, time
from pathlib import Path
from hpcdl import config, liveness, parallel, study, train, worker
cfg = config.load(sys.argv[1])
pace, value = float(sys.argv[3]), float(sys.argv[4])
w = worker.Worker.__new__(worker.Worker)
w.config, w.worker_id, w.trial, w.nothing_completed = cfg, int(sys.argv[2]), None, False
w.ranks = parallel.Ranks(0, 1, 0, 1, "single", None, socket.gethostname())
w.study = study.open_study(cfg, w.worker_id)
metric = cfg.section("search")["metric"]
while (plan := w.next_plan()) is not None:
    print("trial", plan.number, flush=True)
    values = []
    with liveness.heartbeat(study.storage_of(w.study), study.trial_id(w.trial),
                            cfg.section("search")["heartbeat_s"]):
        for epoch in range(cfg.params["epochs"]):
            time.sleep(pace)
            values.append(value)
            if w.decide_prune(epoch, {metric: value}):
                break
    stop = (train.StopReason.PRUNED if len(values) < cfg.params["epochs"]
            else train.StopReason.COMPLETED)
    w._tell_result(train.RunResult(stop, {metric: values, "loss": values}, {}, 10, 1.0,
                                   Path("-")))
"""

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start(cfg: Path, worker_id: int, pace: float = 0.0, value: float = 0.9
          ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", RANK0, str(cfg), str(worker_id), str(pace),
                             str(value)], env=hpcdl_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(workers: list[subprocess.Popen[str]]) -> None:
    for w in workers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0, out[-3000:]


# `hpcdl storage serve` with listings cached for an hour: a listing that a write fails to
# refresh stays stale for the whole test instead of for a second, so the bug cannot hide
SERVE = """
import sys
from hpcdl import cli, listing_cache
listing_cache.TTL_S = 3600
sys.exit(cli.main(sys.argv[1:]))
"""


@contextmanager
def proxy(cfg: Path) -> Iterator[None]:
    """`hpcdl storage serve` for the config's grpc:// URL, stopped afterwards."""
    port = int(config.load(cfg).storage_url.rpartition(":")[2])
    server = subprocess.Popen([sys.executable, "-c", SERVE, "storage", "serve", "--config",
                               str(cfg), "--host", "127.0.0.1"], env=hpcdl_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and server.poll() is None, "no gRPC proxy"
            time.sleep(0.2)
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)


def storage_url(kind: str, tmp_path: Path) -> str:
    return {"journal": "journal", "sqlite": f"sqlite:///{tmp_path}/study.db",
            "grpc": f"grpc://127.0.0.1:{free_port()}"}[kind]


@contextmanager
def serving(cfg: Path, kind: str) -> Iterator[None]:
    if kind == "grpc":
        with proxy(cfg):
            yield
    else:
        yield


def trials_of(cfg: Path) -> list[optuna.trial.FrozenTrial]:
    loaded = config.load(cfg)
    return optuna.load_study(study_name=loaded.name,
                             storage=study.open_storage(loaded)).get_trials()


@pytest.mark.parametrize("kind", ["journal", "sqlite", "grpc"])
def test_six_workers_finish_exactly_the_budget(tmp_path: Path, kind: str) -> None:
    cfg = write_sweep_config(tmp_path, storage=storage_url(kind, tmp_path),
                             search={"n_trials": 15, "sampler": "random", "pruner": "none"},
                             train={"epochs": 2})
    with serving(cfg, kind):
        workers = [start(cfg, i, pace=0.3) for i in range(6)]
        finish(workers)
        trials = trials_of(cfg)
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 15  # not one more, not one less
    assert len({t.number for t in trials}) == len(trials)
    # every other trial lost the race for the last slots and says so; none failed otherwise
    extra = [t for t in trials if t.state not in FINISHED]
    assert all(t.state == TrialState.FAIL and t.system_attrs.get(study.SURPLUS) for t in extra)
    assert len({t.system_attrs["hpcdl:worker_id"] for t in finished}) >= 2


@pytest.mark.parametrize("kind", ["journal", "grpc"])
def test_a_killed_workers_trial_is_recovered_although_a_sweep_just_ran(
        tmp_path: Path, kind: str) -> None:
    # heartbeat_s (the sweep period) far longer than the test: only the sweep a worker makes
    # before it leaves can find the dead trial
    cfg = write_sweep_config(tmp_path, storage=storage_url(kind, tmp_path),
                             search={"n_trials": 6, "sampler": "random", "pruner": "none",
                                     "heartbeat_s": 3600, "stale_after_s": 3600},
                             train={"epochs": 2})
    with serving(cfg, kind):
        victim = start(cfg, 0, pace=600)
        assert victim.stdout is not None
        while not victim.stdout.readline().startswith("trial 0"):  # past Optuna's log lines
            assert victim.poll() is None, "the victim ended before its trial"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert [t.state for t in trials_of(cfg)] == [TrialState.RUNNING]
        finish([start(cfg, i) for i in (1, 2)])
        trials = trials_of(cfg)
    lost = trials[0]
    assert lost.state == TrialState.FAIL
    assert lost.system_attrs[study.FAIL_REASON].startswith("worker lost: owner pid")
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(rerun) == 1 and rerun[0].state in FINISHED and rerun[0].params == lost.params
    assert sum(t.state in FINISHED for t in trials) == 6


def test_the_stale_sweep_runs_once_per_period_for_the_whole_study(tmp_path: Path) -> None:
    cfg = config.load(write_sweep_config(tmp_path, search={"heartbeat_s": 30}))
    first, second = study.open_study(cfg, 0), study.open_study(cfg, 1)
    now = time.time()
    assert study.stale_sweep_due(first, cfg, now)
    assert not study.stale_sweep_due(second, cfg, now + 1)  # another worker, same study
    assert not study.stale_sweep_due(first, cfg, now + 29)
    assert study.stale_sweep_due(second, cfg, now + 31)


def test_a_prune_decision_through_the_proxy_sees_trials_finished_just_before(
        tmp_path: Path) -> None:
    cfg = write_sweep_config(tmp_path, storage=storage_url("grpc", tmp_path),
                             search={"n_trials": 4, "sampler": "random", "pruner": "median",
                                     "pruner_startup_trials": 2, "pruner_warmup_epochs": 0,
                                     "direction": "maximize", "metric": "val_accuracy"},
                             train={"epochs": 2})
    loaded = config.load(cfg)
    with proxy(cfg):
        s = study.open_study(loaded, 9)
        trial = s.ask()
        trial.report(0.1, 1)
        assert not trial.should_prune()  # nothing finished yet; the proxy now holds a listing
        finish([start(cfg, 0, value=0.9)])  # another process finishes the other three trials
        assert trial.should_prune()  # 0.1 against a median of 0.9 at step 1
        assert sum(t.state == TrialState.COMPLETE for t in s.get_trials()) == 3


def test_a_listing_through_the_proxy_shows_trials_created_just_before(tmp_path: Path) -> None:
    # the surplus check relies on it: every trial numbered below one's own must be counted
    cfg = write_sweep_config(tmp_path, storage=storage_url("grpc", tmp_path),
                             search={"n_trials": 2, "sampler": "random", "pruner": "none"})
    loaded = config.load(cfg)
    ask = ("import sys; from hpcdl import config, study; "
           "study.open_study(config.load(sys.argv[1]), 1).ask()")
    with proxy(cfg):
        s = study.open_study(loaded, 0)
        assert s.get_trials() == []  # the proxy now holds a listing
        subprocess.run([sys.executable, "-c", ask, str(cfg)], env=hpcdl_env(), check=True)
        subprocess.run([sys.executable, "-c", ask, str(cfg)], env=hpcdl_env(), check=True)
        mine = s.ask()
        assert [t.number for t in s.get_trials()] == [0, 1, 2]
        assert study.is_surplus(s, mine, loaded)  # two trials below it claim the budget of 2
