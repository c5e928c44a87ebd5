"""hpcdl/study.py and liveness.py on real Optuna storages (journal and SQLite files): budget,
stale-trial recovery, samplers, pruners, search space, storage URLs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import write_sweep_config
from hpcdl import config, liveness, study
from hpcdl.errors import ConfigError


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return config.load(write_sweep_config(tmp_path, search={"n_trials": 3, "stale_after_s": 60}))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_journal_study_is_shared_and_checked(cfg: config.Config) -> None:
    first = study.open_study(cfg, worker_id=0)
    second = study.open_study(cfg, worker_id=1)  # a second worker loads the same study
    first.enqueue_trial({"width": 20})
    assert second.get_trials()[0].system_attrs["fixed_params"] == {"width": 20}
    assert cfg.paths.journal.is_file()
    assert second.user_attrs["config"]["name"] == "sweep"
    minimize = cfg.with_params({})  # same study name, other direction -> refused
    doc = minimize.as_dict()
    doc["search"]["direction"] = "minimize"
    with pytest.raises(ConfigError, match="was created to \\['maximize'\\]"):
        study.open_study(config.Config(doc, cfg.origin))


def test_budget_counts_the_whole_study(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    assert study.budget_left(s, cfg) is None
    done, pruned, running = s.ask(), s.ask(), s.ask()
    s.tell(done, 0.5)
    s.tell(pruned, state=TrialState.PRUNED)
    assert running.number == 2
    assert study.budget_left(s, cfg) == "budget of 3 trials claimed"
    s.tell(running, state=TrialState.FAIL)  # failures do not count by default...
    assert study.budget_left(s, cfg) is None
    counting = config.Config({**cfg.as_dict(), "search": {**cfg.section("search"),
                                                           "count_failed": True}}, cfg.origin)
    assert study.budget_left(s, counting) is not None  # ...unless count_failed


def test_surplus_trial_loses_to_lower_numbers(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    trials = [s.ask() for _ in range(4)]  # four workers asked at once for a budget of three
    assert [study.is_surplus(s, t, cfg) for t in trials] == [False, False, False, True]


def test_stale_trial_is_failed_and_requeued_once(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    trial = s.ask({"width": optuna.distributions.IntDistribution(16, 128)})
    storage = s._storage
    for key, value in liveness.owner_attrs(0, "123").items():
        storage.set_trial_system_attr(trial._trial_id, key, value)
    storage.set_trial_system_attr(trial._trial_id, liveness.PID, dead_pid())
    assert study.recover_stale_trials(s, cfg) == [trial.number]
    assert study.recover_stale_trials(study.open_study(cfg, 1), cfg) == []  # no double requeue
    trials = s.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].system_attrs[study.FAIL_REASON].startswith("worker lost: owner pid")
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == 0
    assert study.budget(trials, count_failed=True).failed == 0  # replaced, not a failure


def test_stale_by_heartbeat_age(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    trial = s.ask()
    storage = s._storage
    for key, value in liveness.owner_attrs(0, None).items():
        storage.set_trial_system_attr(trial._trial_id, key, value)
    storage.set_trial_system_attr(trial._trial_id, liveness.HOST, "another-node")
    frozen = storage.get_trial(trial._trial_id)
    assert liveness.stale_reason(frozen, stale_after_s=60) is None  # alive, elsewhere
    reason = liveness.stale_reason(frozen, stale_after_s=60, now=time.time() + 120)
    assert reason and reason.startswith("no heartbeat from another-node")


def test_heartbeat_thread_refreshes(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    trial = s.ask()
    storage = s._storage
    storage.set_trial_system_attr(trial._trial_id, liveness.HEARTBEAT, 0.0)
    with liveness.heartbeat(storage, trial._trial_id, interval_s=0.05):
        time.sleep(0.3)
    assert storage.get_trial(trial._trial_id).system_attrs[liveness.HEARTBEAT] > time.time() - 5


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "qmc", "grid"])
@pytest.mark.parametrize("pruner", ["none", "median", "hyperband", "successive_halving"])
def test_samplers_and_pruners(tmp_path: Path, sampler: str, pruner: str) -> None:
    space = {"width": {"type": "int", "low": 16, "high": 64, "step": 16},
             "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
             "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25}}
    if sampler != "grid":
        space["learning_rate"] = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
    cfg = config.load(write_sweep_config(tmp_path, search={"sampler": sampler, "pruner": pruner,
                                                           "space": space}))
    s = study.open_study(cfg)
    for _ in range(3):
        trial = s.ask()
        params = study.suggest(trial, cfg.section("search")["space"])
        assert params["width"] in (16, 32, 48, 64) and params["dropout"] in (0.0, 0.25, 0.5)
        cfg.with_params(params)  # every suggestion is a valid config
        trial.report(0.5, 1)
        s.tell(trial, 0.5)


def test_grid_space_and_trial_seed() -> None:
    grid = study.grid_space({"depth": {"type": "int", "low": 1, "high": 3, "step": None},
                             "dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1}})
    assert grid == {"depth": [1, 2, 3], "dropout": [0.0, 0.1, 0.2]}
    assert study.trial_seed(0, 5) == study.trial_seed(0, 5) != study.trial_seed(0, 6)


def test_sqlite_storage_warns_and_has_heartbeat(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    cfg = config.load(write_sweep_config(tmp_path, storage=f"sqlite:///{tmp_path}/s.db"))
    storage = study.open_storage(cfg)
    assert "SQLite is for one node" in caplog.text
    assert liveness.uses_optuna_heartbeat(storage)
    study.open_study(cfg, storage=storage)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:////nonexistent-dir/x/s.db", "cannot open 'sqlite:////nonexistent-dir/x/s.db'"),
        ("postgresql://nobody@127.0.0.1:1/none", "cannot open 'postgresql://nobody@127.0.0.1:1"),
        ("redis://localhost", "'redis://localhost' is not journal"),
        ("grpc://nohostport", "expected grpc://HOST:PORT"),
    ],
)
def test_bad_storage_urls(tmp_path: Path, url: str, message: str) -> None:
    cfg = config.load(write_sweep_config(tmp_path, storage=url))
    with pytest.raises(ConfigError, match="storage: ") as info:
        study.open_storage(cfg)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"metric": "f1"}, "search.metric: unknown metric 'f1'"),
        ({"second_objective": {"metric": "n_params", "direction": "minimize"}},
         "Optuna cannot prune a two-objective sweep"),
        ({"second_objective": {"metric": "speed", "direction": "minimize"}, "pruner": "none"},
         "search.second_objective.metric: unknown metric 'speed'"),
    ],
)
def test_bad_objectives(tmp_path: Path, search: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write_sweep_config(tmp_path, search=search))
    assert message in str(info.value)
