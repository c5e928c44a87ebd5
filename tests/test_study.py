"""hpcdl/study.py and liveness.py on real Optuna storages (journal and SQLite files, a PostgreSQL
server): budget, stale-trial recovery, samplers, pruners, search space, storage URLs, and
`hpcdl dashboard` on the database storages."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import free_port, hpcdl_env, write_sweep_config
from hpcdl import config, liveness, study
from hpcdl.errors import ConfigError

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "cmaes": optuna.samplers.CmaEsSampler, "qmc": optuna.samplers.QMCSampler,
            "grid": optuna.samplers.GridSampler}
PRUNERS = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "hyperband": optuna.pruners.HyperbandPruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner}


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
    assert study.budget(s.get_trials(), count_failed=False) == study.Budget(2, 3, 0)
    s.tell(running, state=TrialState.FAIL)  # failures do not count by default...
    assert study.budget(s.get_trials(), count_failed=False) == study.Budget(2, 2, 1)
    assert study.budget_left(s, cfg) is None
    counting = config.Config({**cfg.as_dict(), "search": {**cfg.section("search"),
                                                           "count_failed": True}}, cfg.origin)
    assert study.budget(s.get_trials(), count_failed=True) == study.Budget(3, 3, 1)
    assert study.budget_left(s, counting) == "budget of 3 trials claimed"  # ...unless count_failed
    s.enqueue_trial({})  # an enqueued trial still needs a worker, whatever was claimed
    assert study.budget(s.get_trials(), count_failed=True) == study.Budget(3, 4, 1)
    assert study.budget_left(s, counting) is None
    s.tell(s.ask(), state=TrialState.FAIL)  # the enqueued one fails too: 2 of 3 failures
    assert study.budget(s.get_trials(), count_failed=False) == study.Budget(2, 2, 2)
    assert study.budget_left(s, cfg) is None
    s.tell(s.ask(), state=TrialState.FAIL)
    assert study.budget_left(s, cfg) == "3 trials failed: giving up"


def test_surplus_trial_loses_to_lower_numbers(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    trials = [s.ask() for _ in range(4)]  # four workers asked at once for a budget of three
    assert [study.is_surplus(s, t, cfg) for t in trials] == [False, False, False, True]
    s._storage.set_trial_system_attr(trials[3]._trial_id, study.SURPLUS, True)
    s.tell(trials[3], state=TrialState.FAIL)  # as the worker tells a surplus trial
    for t in trials[:3]:
        s.tell(t, 0.5)
    assert study.budget(s.get_trials(), count_failed=True) == study.Budget(3, 3, 0)
    assert study.budget_left(s, cfg) == "budget of 3 trials claimed"


def claim_for_a_dead_worker(s: optuna.Study, trial: optuna.Trial) -> None:
    """Record a worker as the trial's owner, as Worker does, whose process has exited."""
    for key, value in liveness.owner_attrs(0, "123").items():
        s._storage.set_trial_system_attr(trial._trial_id, key, value)
    s._storage.set_trial_system_attr(trial._trial_id, liveness.PID, dead_pid())


def test_a_rerun_is_never_surplus(cfg: config.Config) -> None:
    """Budget 3: trial 0's worker died, 1 and 2 completed, trial 3 was just asked by a worker
    that has not yet told it surplus; the re-run of 0 (trial 4) keeps 0's slot (a CI run lost
    it: 3 RUNNING made 4 look surplus too, and the sweep ended one trial short)."""
    s = study.open_study(cfg)
    width = {"width": optuna.distributions.IntDistribution(16, 128)}
    trials = [s.ask(width) for _ in range(3)]
    claim_for_a_dead_worker(s, trials[0])
    for t in trials[1:]:
        s.tell(t, 0.5)
    late = s.ask()
    assert study.is_surplus(s, late, cfg)
    assert study.recover_stale_trials(s, cfg) == [0]
    rerun = s.ask()
    assert rerun.number == 4 and s.get_trials()[4].system_attrs["failed_trial"] == 0
    assert not study.is_surplus(s, rerun, cfg)


def test_stale_trial_is_failed_and_requeued_once(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    trial = s.ask({"width": optuna.distributions.IntDistribution(16, 128)})
    claim_for_a_dead_worker(s, trial)
    assert study.recover_stale_trials(s, cfg) == [trial.number]
    assert study.recover_stale_trials(study.open_study(cfg, 1), cfg) == []  # no double requeue
    trials = s.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].system_attrs[study.FAIL_REASON].startswith("worker lost: owner pid")
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == 0
    assert study.budget(trials, count_failed=True).failed == 0  # replaced, not a failure
    # the re-run trains with the first attempt's seed: the run it resumes, and what the report's
    # reproduce command and the final retrain must use
    assert study.seed_of(cfg, trials[1]) == study.seed_of(cfg, trials[0]) == study.trial_seed(0, 0)
    assert study.trial_seed(0, 1) != study.trial_seed(0, 0)


def test_a_rerun_taken_but_not_yet_claimed_is_not_failed_by_another_sweep(
        cfg: config.Config) -> None:
    """Between a worker's ask() of a re-queued trial and its claim (owner attrs), another
    worker's sweep must not take the re-run for its dead predecessor (CI failure of
    test_many_workers: the re-run had inherited the dead owner's pid and heartbeat)."""
    s = study.open_study(cfg)
    trial = s.ask({"width": optuna.distributions.IntDistribution(16, 128)})
    claim_for_a_dead_worker(s, trial)
    assert study.recover_stale_trials(s, cfg) == [trial.number]
    rerun = study.open_study(cfg, 1).ask()  # the next worker takes it, not yet claimed
    assert study.recover_stale_trials(study.open_study(cfg, 2), cfg) == []
    stored = study.load_study(cfg).get_trials()
    assert [t.state for t in stored] == [TrialState.FAIL, TrialState.RUNNING]
    assert rerun.number == 1 and stored[1].system_attrs["failed_trial"] == 0
    assert not set(stored[1].system_attrs) & {*liveness.OWNER_KEYS, study.FAIL_REASON}


def test_a_lost_trial_is_retried_at_most_three_times(cfg: config.Config) -> None:
    s = study.open_study(cfg)
    trial = s.ask({"width": optuna.distributions.IntDistribution(16, 128)})
    for attempt in range(study.MAX_RETRIES + 1):  # its owner dies every time
        claim_for_a_dead_worker(s, trial)
        assert study.recover_stale_trials(s, cfg) == [trial.number]
        waiting = s.get_trials(states=(TrialState.WAITING,))
        if attempt == study.MAX_RETRIES:
            assert waiting == []
            break
        assert len(waiting) == 1
        trial = s.ask()  # the next worker takes the re-queued trial
        assert trial.number == waiting[0].number
    trials = study.load_study(cfg).get_trials()  # as stored (Optuna's callback edits in place)
    assert [t.state for t in trials] == [TrialState.FAIL] * 4 and study.MAX_RETRIES == 3
    assert [t.system_attrs.get("failed_trial") for t in trials] == [None, 0, 0, 0]
    assert trials[-1].system_attrs["retry_history"] == [0, 1, 2]
    assert all(t.params == trials[0].params for t in trials)
    # the three re-run failures are replaced; the last one is the study's one real failure
    assert study.budget(trials, count_failed=True) == study.Budget(1, 1, 1)
    assert study.budget_left(s, cfg) is None  # one failure of three allowed: the sweep goes on


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


def test_heartbeat_failures_are_one_warning(cfg: config.Config,
                                           caplog: pytest.LogCaptureFixture) -> None:
    s = study.open_study(cfg)
    trial = s.ask()
    s.tell(trial, 0.5)  # a finished trial takes no more attributes: every beat fails
    with caplog.at_level(logging.WARNING, "hpcdl.liveness"), liveness.heartbeat(
            s._storage, trial._trial_id, interval_s=0.05):
        time.sleep(0.5)
    assert [r.getMessage() for r in caplog.records if r.name == "hpcdl.liveness"] == [
        f"trial id {trial._trial_id}: heartbeat not recorded (Trial#0 has already finished and "
        "can not be updated.); other workers may take the trial for lost"]


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
    assert type(s.sampler) is SAMPLERS[sampler] and type(s.pruner) is PRUNERS[pruner]
    if pruner == "hyperband":
        assert s.pruner._max_resource == cfg.params["epochs"] == 4
    if pruner == "median":
        search = cfg.section("search")
        assert s.pruner._n_startup_trials == search["pruner_startup_trials"]
        assert s.pruner._n_warmup_steps == search["pruner_warmup_epochs"]
    for _ in range(3):
        trial = s.ask()
        params = study.suggest(trial, cfg.section("search")["space"])
        assert params["width"] in (16, 32, 48, 64) and params["dropout"] in (0.0, 0.25, 0.5)
        cfg.with_params(params)  # every suggestion is a valid config
        trial.report(0.5, 1)
        s.tell(trial, 0.5)


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "qmc", "grid"])
def test_workers_draw_from_their_own_seeds(tmp_path: Path, sampler: str) -> None:
    """Two workers of one sweep (same config seed) draw different first trials, else their
    random start-up trials would coincide; QMC's workers share one sequence by design."""
    space = {"width": {"type": "int", "low": 16, "high": 64, "step": 16},
             "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25}}
    if sampler != "grid":
        space["learning_rate"] = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
    draws = []
    for worker_id in (0, 1):  # each in a study of its own: the sampler alone decides
        (tmp_path / str(worker_id)).mkdir()
        cfg = config.load(write_sweep_config(tmp_path / str(worker_id), search={
            "sampler": sampler, "space": space}))
        s = study.open_study(cfg, worker_id=worker_id)
        draws.append([study.suggest(s.ask(), cfg.section("search")["space"]) for _ in range(3)])
    assert (draws[0] == draws[1]) == (sampler == "qmc"), draws


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


def get_json(url: str, timeout: float = 120) -> Any:
    """GET url's JSON, retrying while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_dashboard_serves_rdb_storages(tmp_path: Path, backend: str,
                                       request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path}/s.db" if backend == "sqlite"
           else request.getfixturevalue("postgres"))
    name = f"dashboard-{backend}"  # the PostgreSQL server is shared by the session's tests
    cfg_path = write_sweep_config(tmp_path, name=name, storage=url)
    s = study.open_study(config.load(cfg_path))
    for value in (0.25, 0.75):
        s.tell(s.ask(), value)
    port = free_port()
    server = subprocess.Popen(["hpcdl", "dashboard", "--config", str(cfg_path), "--port",
                               str(port)], env=hpcdl_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        listed = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        [ours] = [x for x in listed if x["study_name"] == name]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{ours['study_id']}")
        assert detail["name"] == name
        assert [t["values"] for t in detail["trials"]] == [[0.25], [0.75]]
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"optuna-dashboard for sweep {name} ({url}) at http://127.0.0.1:{port}/" in out


# ---------------------------------------------------------------- a sweep that knows its config


def failed_first_attempt(tmp_path: Path) -> tuple[Path, optuna.Study]:
    """A sweep whose first attempt failed all its 3 trials (as a broken config's would)."""
    path = write_sweep_config(tmp_path, search={"n_trials": 3})
    cfg = config.load(path)
    s = study.open_study(cfg)
    for _ in range(3):
        trial = s.ask()
        study.suggest(trial, cfg.section("search")["space"])
        s.tell(trial, state=TrialState.FAIL)
    assert study.budget_left(s, config.load(path)) == "3 trials failed: giving up"
    return path, s


def rerun(path: Path, overrides: list[str], continue_changed: bool = False) -> optuna.Study:
    return study.open_study(config.load(path, overrides), continue_changed=continue_changed)


def test_changed_config_stops_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    path, s = failed_first_attempt(tmp_path)
    before = (s.user_attrs, len(s.get_trials()))
    with pytest.raises(ConfigError) as info:
        rerun(path, ["train.batch_size=16", "search.space.width.log=false", "resources.workers=3"])
    assert str(info.value) == (
        f"{path}: study 'sweep' in journal ran under another config; changed: "
        "search.space.width.log (True -> False), train.batch_size (32 -> 16); its trials "
        "would not compare with new ones: give the sweep a new name, or continue this study "
        "on purpose with `hpcdl worker --continue-changed` (for the workers Snakemake or "
        "sbatch start: HPCDL_CONTINUE_CHANGED=1 in the environment)")
    again = study.load_study(config.load(path))
    assert (again.user_attrs, len(again.get_trials())) == before


def test_a_log_flag_change_is_refused_even_on_purpose(tmp_path: Path) -> None:
    """Optuna raises ValueError at the next suggest: refused up front, one line."""
    path, _ = failed_first_attempt(tmp_path)
    with pytest.raises(ConfigError) as info:
        rerun(path, ["search.space.width.log=false"], continue_changed=True)
    assert str(info.value) == (
        f"{path}: study 'sweep' in journal: search.space.width.log changed, which Optuna "
        "cannot continue within one study (a parameter's kind, log scale and choices are "
        "fixed); give the sweep a new name")
    assert study.CONFIG_CHANGES not in study.load_study(config.load(path)).user_attrs


def test_continue_changed_is_recorded_and_old_failures_do_not_count(tmp_path: Path) -> None:
    path, _ = failed_first_attempt(tmp_path)
    s = rerun(path, ["train.batch_size=16"], continue_changed=True)
    cfg = config.load(path, ["train.batch_size=16"])
    [change] = s.user_attrs[study.CONFIG_CHANGES]
    assert change["changed"] == ["train.batch_size"] and change["from_trial"] == 3
    assert change["continued_on_purpose"] is True and change["at"].endswith("+00:00")
    assert s.user_attrs["config"]["train"]["batch_size"] == 16
    # the corrected config runs: the first attempt's 3 failures are not counted against it
    assert study.budget_left(s, cfg) is None
    s.tell(s.ask(), state=TrialState.FAIL)
    assert study.budget_left(s, cfg) is None
    rerun(path, ["train.batch_size=16"])  # the same config again: no new record
    assert len(study.load_study(cfg).user_attrs[study.CONFIG_CHANGES]) == 1


def test_comparable_changes_continue_the_study(tmp_path: Path) -> None:
    path, _ = failed_first_attempt(tmp_path)
    s = rerun(path, ["search.n_trials=5", "resources.workers=4", "search.timeout_min=30",
                     "search.heartbeat_s=10"])
    [change] = s.user_attrs[study.CONFIG_CHANGES]
    assert change["changed"] == ["resources.workers", "search.heartbeat_s", "search.n_trials",
                                 "search.timeout_min"]
    assert change["continued_on_purpose"] is False
    assert study.budget_left(s, config.load(path, ["search.n_trials=5"])) is None
