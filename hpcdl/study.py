"""Optuna only: storage from URL (and the gRPC proxy serving it), sampler/pruner, search space ->
params, the trial budget, the best trial, stale-trial recovery.

W workers share one study and one budget: `search.n_trials` finished trials in the whole study,
not per worker. The worker loop that uses all this is worker.py; readers (report, status) import
this module without loading any training code. Optuna's private API is used in three helpers
only, `storage_of`, `trial_id` and `study_key`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from hpcdl import liveness
from hpcdl.config import Config, validate
from hpcdl.errors import ConfigError, UserError
from hpcdl.journal_listing import IndexedJournalStorage
from hpcdl.journal_lock import FairOpenLock
from hpcdl.listing_cache import ListingCache

log = logging.getLogger("hpcdl.study")
# The retry callback and its helpers are marked experimental since Optuna 2.8; we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FAIL_REASON = "hpcdl:fail_reason"
SURPLUS = "hpcdl:surplus"
TRIAL_FILE = "hpcdl:trial_file"
STALE_SWEEP_AT = "hpcdl:stale_sweep_at"  # study system attr: when a worker last swept
MAX_RETRIES = 3
# gRPC proxy server threads: each serves one call at a time; a storage call is mostly Python
# under the GIL, so more threads than this queue in the server instead of in the clients.
PROXY_THREADS = 16
# study user attrs: the config the study runs under, and each change of it on a rerun
CONFIG = "config"
CONFIG_CHANGES = "config_changes"
# Config keys (and sections) whose change keeps trials comparable: how many trials and how
# long, where and on what they run, where the study is kept. Any other change (dataset, model,
# train, search space, objective, sampler, pruner, seeds) stops a rerun unless continued on
# purpose (`hpcdl worker --continue-changed`, or this variable set to 1 in the environment of
# the workers Snakemake or sbatch start).
CONTINUE_CHANGED_ENV = "HPCDL_CONTINUE_CHANGED"
COMPARABLE = ("search.n_trials", "search.timeout_min", "search.count_failed",
              "search.heartbeat_s", "search.stale_after_s", "resources", "storage",
              "results_dir", "dataset.source_dir", "train.intra_op_threads")


# ---------------------------------------------------------------- Optuna's private API


def storage_of(study: optuna.Study) -> BaseStorage:
    """The study's storage (private: `Study._storage`). The public API cannot set a trial's
    system attributes (Trial.set_system_attr, deprecated in Optuna 3.1, no longer exists), fail
    a trial that another process owns, or read one trial; the storage can, and the heartbeat
    writes through it."""
    return study._storage


def trial_id(trial: Trial | FrozenTrial) -> int:
    """The storage's key of a trial (private: `_trial_id`). Every storage method takes it; the
    public API offers only the trial's number, which the storage cannot look up by itself."""
    return trial._trial_id


def study_key(study: optuna.Study) -> int:
    """The storage's key of a study (private: `_study_id`): study system attributes (hpcdl's
    bookkeeping, kept out of the user attributes the dashboard shows) are written by key."""
    return study._study_id


# ---------------------------------------------------------------- storage, sampler, pruner


def open_storage(config: Config, url: str | None = None) -> BaseStorage:
    """The config's storage URL as an Optuna storage; ConfigError with the reason if it fails."""
    url = config.storage_url if url is None else url
    search = config.section("search")
    retry = RetryHeartbeatStaleTrialCallback(
        max_retry=MAX_RETRIES, inherit_intermediate_values=True
    )
    try:
        if url == "journal":
            path = config.paths.journal
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend

            # An open(O_CREAT|O_EXCL) lock works on NFS, where symlink/flock locks may not;
            # Optuna's own starves old waiters under many writers (see journal_lock). Its
            # listings walk the whole study at every prune check (see journal_listing).
            backend = JournalFileBackend(str(path), lock_obj=FairOpenLock(str(path)))
            return IndexedJournalStorage(backend)
        if url.startswith(("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+")):
            if url.startswith("sqlite:"):
                log.warning(
                    "storage %s: SQLite is for one node; on several nodes use journal "
                    "on a shared file system, PostgreSQL, or the gRPC proxy",
                    url,
                )
            return _open_rdb(url, search, retry)
        if url.startswith("grpc://"):
            host, _, port = url.removeprefix("grpc://").rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"{config.origin}: storage: {url!r}: expected grpc://HOST:PORT")
            log.info("storage: gRPC proxy at %s:%s", host, port)
            return optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    except ConfigError:
        raise
    except Exception as exc:
        # drivers explain over several lines (psycopg2 adds hints and a link): the first says it
        reason = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise ConfigError(f"{config.origin}: storage: cannot open {url!r}: {reason}") from exc
    raise ConfigError(
        f"{config.origin}: storage: {url!r} is not journal, sqlite:///FILE, "
        "postgresql://..., mysql://... or grpc://HOST:PORT"
    )


def _open_rdb(
    url: str, search: Mapping[str, Any], retry: RetryHeartbeatStaleTrialCallback
) -> BaseStorage:
    """RDBStorage with Optuna's heartbeat. Workers starting together race to create the
    tables (PostgreSQL: duplicate key on CREATE TYPE), so a failed first open is retried."""

    # SQLAlchemy's default driver for mysql:// is mysqlclient, a C extension we do not ship;
    # PyMySQL (requirements.lock) speaks to MySQL and MariaDB alike.
    driver_url = "mysql+pymysql://" + url.removeprefix("mysql://") if url.startswith(
        "mysql://") else url

    def connect() -> BaseStorage:
        return optuna.storages.RDBStorage(
            driver_url,
            heartbeat_interval=max(1, int(search["heartbeat_s"])),
            grace_period=max(2, int(search["stale_after_s"])),
            heartbeat_stale_trial_callback=retry,
        )

    for delay in (0.5, 1.0, 2.0):
        try:
            return connect()
        except Exception as exc:
            log.info("storage %s: %s; retrying in %.1fs", url, str(exc).splitlines()[0], delay)
            time.sleep(delay)
    return connect()  # the last attempt's error goes to the caller


def make_sampler(config: Config, worker_id: int) -> optuna.samplers.BaseSampler:
    """Seeded sampler. Workers get distinct seeds (else their random start-up trials would
    coincide), except QMC, whose sequence must be the same one for all workers."""
    search = config.section("search")
    seed = search["seed"]
    worker_seed = int(np.random.SeedSequence([seed, worker_id]).generate_state(1)[0])
    name = search["sampler"]
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=worker_seed, multivariate=True, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=worker_seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(search["space"]), seed=worker_seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=worker_seed, warn_independent_sampling=False)
    return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)


def make_pruner(config: Config) -> optuna.pruners.BasePruner:
    search, epochs = config.section("search"), config.params["epochs"]
    name = search["pruner"]
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=search["pruner_startup_trials"],
            n_warmup_steps=search["pruner_warmup_epochs"],
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=epochs, reduction_factor=3
        )
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def grid_space(space: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Every point of a discrete space, for the grid sampler."""
    grid: dict[str, list[Any]] = {}
    for name, dist in space.items():
        if dist["type"] == "categorical":
            grid[name] = list(dist["choices"])
        elif dist["type"] == "int":
            grid[name] = list(
                range(int(dist["low"]), int(dist["high"]) + 1, int(dist["step"] or 1))
            )
        else:
            n = round((dist["high"] - dist["low"]) / dist["step"]) + 1
            grid[name] = [float(dist["low"] + i * dist["step"]) for i in range(n)]
    return grid


def suggest(trial: Trial, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The trial's parameters, drawn from the config's search space."""
    params: dict[str, Any] = {}
    for name, dist in space.items():
        if dist["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, dist["choices"])
        elif dist["type"] == "int":
            params[name] = trial.suggest_int(
                name,
                int(dist["low"]),
                int(dist["high"]),
                step=int(dist["step"] or 1),
                log=dist["log"],
            )
        else:
            params[name] = trial.suggest_float(
                name, dist["low"], dist["high"], step=dist["step"], log=dist["log"]
            )
    return params


def directions(config: Config) -> list[str]:
    search = config.section("search")
    second = search["second_objective"]
    return [search["direction"]] + ([second["direction"]] if second else [])


def load_study(config: Config) -> optuna.Study:
    """The sweep's existing study, for readers (report, status, the retrain)."""
    return optuna.load_study(study_name=config.name, storage=open_storage(config))


def open_study(
    config: Config, worker_id: int = 0, storage: BaseStorage | None = None,
    continue_changed: bool = False,
) -> optuna.Study:
    """Create or load the sweep's study; refuse one created for other objectives, or run
    under a config whose results would not compare (unless `continue_changed`)."""
    storage = storage or open_storage(config)
    wanted = directions(config)
    study = optuna.create_study(
        study_name=config.name,
        storage=storage,
        load_if_exists=True,
        sampler=make_sampler(config, worker_id),
        pruner=make_pruner(config),
        directions=wanted,
    )
    have = [d.name.lower() for d in study.directions]
    if have != wanted:
        raise ConfigError(
            f"{config.origin}: study {config.name!r} in {config.storage_url}"
            f" was created to {have}, but the config asks to {wanted}"
        )
    stored = study.user_attrs.get(CONFIG)
    if stored is None:
        study.set_user_attr(CONFIG, config.as_dict())
    else:
        adopt_config(study, stored, config, continue_changed)
    return study


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config as dotted key -> value (lists are values)."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: key -> (old, new); None where a key is absent."""
    before, after = _flat(old), _flat(new)
    return {key: (before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)}


def is_comparable(key: str) -> bool:
    return any(key == c or key.startswith(f"{c}.") for c in COMPARABLE)


def optuna_cannot_continue(changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """Changed keys Optuna refuses within one study: a searched parameter's kind, log scale
    or categorical choices (it raises ValueError at the next suggest)."""
    return [key for key, (old, new) in changes.items()
            if key.startswith("search.space.") and key.endswith((".type", ".log", ".choices"))
            and old is not None and new is not None]


def adopt_config(study: optuna.Study, stored: Mapping[str, Any], config: Config,
                 continue_changed: bool) -> None:
    """A rerun: continue under `config` if its changes keep results comparable, or if the
    user continues on purpose (recorded in the study); else one ConfigError listing them.
    Nothing is written to the study before the decision."""
    with contextlib.suppress(ConfigError):  # a config stored by an older hpcdl: fill new defaults
        stored = validate(dict(stored), "study")
    changes = config_changes(stored, config.as_dict())
    if not changes:
        return
    where = f"{config.origin}: study {config.name!r} in {config.storage_url}"
    listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changes.items()
                       if not is_comparable(key))
    if listed and not continue_changed:
        raise ConfigError(
            f"{where} ran under another config; changed: {listed}; its trials would not "
            "compare with new ones: give the sweep a new name, or continue this study on "
            "purpose with `hpcdl worker --continue-changed` (for the workers Snakemake or "
            f"sbatch start: {CONTINUE_CHANGED_ENV}=1 in the environment)")
    blocked = optuna_cannot_continue(changes)
    if blocked:
        raise ConfigError(
            f"{where}: {', '.join(blocked)} changed, which Optuna cannot continue within one "
            "study (a parameter's kind, log scale and choices are fixed); give the sweep a "
            "new name")
    history = list(study.user_attrs.get(CONFIG_CHANGES, []))
    history.append({"at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "from_trial": len(study.get_trials(deepcopy=False)),
                    "changed": sorted(changes), "continued_on_purpose": bool(listed)})
    study.set_user_attr(CONFIG_CHANGES, history)
    study.set_user_attr(CONFIG, config.as_dict())
    log.warning("study %r: continuing under a changed config (%s)%s", config.name,
                ", ".join(sorted(changes)), " on purpose (--continue-changed)" if listed else "")


def config_since(study: optuna.Study) -> int:
    """The first trial number run under the study's current config."""
    history = study.user_attrs.get(CONFIG_CHANGES, [])
    return history[-1]["from_trial"] if history else 0


def grpc_port(config: Config, port: int | None) -> int:
    """The port `hpcdl storage serve` listens on: the given one, else the config's grpc:// URL's."""
    if port is not None:
        return port
    url = config.storage_url
    if not url.startswith("grpc://"):
        raise UserError(
            f"{config.origin}: storage is {url!r}; give --port, or set storage to "
            "grpc://HOST:PORT so workers know where to connect"
        )
    return int(url.rpartition(":")[2])


def proxy_backend(
    config: Config, url: str | None, force_journal: bool = False
) -> tuple[BaseStorage, str]:
    """The storage `hpcdl storage serve` puts behind Optuna's gRPC proxy, and its name.

    By default an SQLite file in the sweep dir: the proxy is its only client, so SQLite's
    one-node limit does not apply. Optuna's proxy does not support JournalStorage (optuna#6084:
    processes killed at random), so the journal is served only when forced."""
    if url is None:
        path = config.paths.proxy_db
        path.parent.mkdir(parents=True, exist_ok=True)
        search = config.section("search")
        retry = RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_RETRIES, inherit_intermediate_values=True
        )
        return _open_rdb(f"sqlite:///{path}", search, retry), str(path)
    if url == "journal" and not force_journal:
        raise UserError(
            "--backend journal: Optuna's gRPC proxy does not support JournalStorage "
            "(optuna#6084); serve the default SQLite file or an RDB URL, or give --force-journal"
        )
    return open_storage(config, url), url


def serve_grpc_proxy(storage: BaseStorage, host: str, port: int) -> None:
    """Optuna's gRPC proxy in front of `storage` until SIGINT/SIGTERM; then the storage calls in
    flight finish and the process ends at once.

    Two caches in front of the backend: Optuna's `_CachedStorage` (what `get_storage` wraps an
    RDBStorage in: a listing re-reads only unfinished and new trials) and hpcdl's ListingCache
    (the listing itself, for a second). Without them every GetTrials read the whole study:
    4.2 calls/s at 2,000 trials (issue 21); see benchmarks/RESULTS.md for the figures with."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # explicit handlers: a shell starts background jobs with SIGINT ignored (so did CI's), and
    # SIGTERM is what Slurm and `kill` send
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    pool = ThreadPoolExecutor(max_workers=PROXY_THREADS)
    sqlite = getattr(getattr(storage, "engine", None), "name", "") == "sqlite"
    cached = ListingCache(optuna.storages.get_storage(storage), one_writer=sqlite)
    try:
        optuna.storages.run_grpc_proxy_server(cached, host=host, port=port, thread_pool=pool)
    except KeyboardInterrupt:
        log.info("stopping: finishing the storage calls in flight")
        pool.shutdown(wait=True, cancel_futures=True)
        logging.shutdown()
        # every storage call has finished: leave without waiting for gRPC's own teardown
        os._exit(0)


# ---------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How much of the study's trial budget is finished, claimed, and failed."""

    finished: int  # complete + pruned (+ failed when they count)
    claimed: int  # finished + running + waiting
    failed: int  # failed for their own reasons (not retried, not surplus)


def replaced_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Trials re-run under a new number (stale owner, or interrupted and requeued)."""
    return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def budget(
    trials: list[FrozenTrial], count_failed: bool, replaced: set[int] | None = None
) -> Budget:
    """Count `trials`; `replaced` (default: found among them) are failures re-run elsewhere."""
    replaced = replaced_numbers(trials) if replaced is None else replaced
    failed = sum(
        1
        for t in trials
        if t.state == TrialState.FAIL
        and t.number not in replaced
        and not t.system_attrs.get(SURPLUS)
    )
    done = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    active = sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING))
    finished = done + (failed if count_failed else 0)
    return Budget(finished, finished + active, failed)


def budget_left(study: optuna.Study, config: Config) -> str | None:
    """None while trials may still be started; otherwise why the sweep is over."""
    search = config.section("search")
    trials = study.get_trials(deepcopy=False)
    if search["timeout_min"] is not None:
        starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
        if starts and time.time() - min(starts) > search["timeout_min"] * 60:
            return f"wall-clock budget of {search['timeout_min']} min spent"
    spent = budget(trials, search["count_failed"])
    # giving up counts failures under the current config: a corrected config gets a new chance
    since = config_since(study)
    failed = budget([t for t in trials if t.number >= since], search["count_failed"],
                    replaced_numbers(trials)).failed
    if failed >= search["n_trials"]:
        return f"{failed} trials failed: giving up"
    if any(t.state == TrialState.WAITING for t in trials):
        return None  # enqueued or re-queued trials are claimed budget that still needs a worker
    if spent.claimed >= search["n_trials"]:
        return f"budget of {search['n_trials']} trials claimed"
    return None


def nothing_completed(study: optuna.Study) -> bool:
    """The sweep is over without a result: no trial completed and none is still running or
    waiting (a worker ending then exits non-zero, so no report of nothing is made)."""
    states = {t.state for t in study.get_trials(deepcopy=False)}
    return not states & {TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING}


def is_surplus(study: optuna.Study, trial: Trial, config: Config) -> bool:
    """Did other workers claim the whole budget between our check and our ask?

    Trial numbers are handed out atomically, so the lowest numbers win: a trial is surplus if
    the trials numbered below it already claim n_trials. A re-run never is: it takes the slot
    its failed attempt claimed (and a lower-numbered trial still on its way to being told
    surplus would otherwise push it out, losing the re-run).
    """
    search = config.section("search")
    trials = study.get_trials(deepcopy=False)
    if any(t.number == trial.number and RetryHeartbeatStaleTrialCallback.retry_history(t)
           for t in trials):
        return False
    earlier = [t for t in trials if t.number < trial.number]
    claimed = budget(earlier, search["count_failed"], replaced_numbers(trials)).claimed
    return claimed >= search["n_trials"]


# ---------------------------------------------------------------- recovery


def fail_and_retry(study: optuna.Study, trial: Trial | FrozenTrial, reason: str) -> bool:
    """Mark a trial FAILED with `reason` and enqueue its params again (at most MAX_RETRIES).

    Returns False if another worker got there first (the state change is atomic).
    """
    storage, key = storage_of(study), trial_id(trial)
    try:
        storage.set_trial_system_attr(key, FAIL_REASON, reason)
        if not storage.set_trial_state_values(key, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    failed = storage.get_trial(key)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)(
        study, attempt_for_retry(failed)
    )
    return True


def attempt_for_retry(failed: FrozenTrial) -> FrozenTrial:
    """The failed attempt as Optuna's retry callback should copy it: the callback gives the
    re-run every system attr of the attempt, and with the dead owner's pid and heartbeat, a
    re-run just asked and not yet claimed by its new worker looked stale to another worker's
    sweep, which failed it under that worker. Also a copy of the retry history, which the
    callback appends to in place (the storage's own cached trial otherwise)."""
    attempt = copy.copy(failed)
    attempt.system_attrs = {key: value for key, value in failed.system_attrs.items()
                            if key not in (*liveness.OWNER_KEYS, FAIL_REASON)}
    if "retry_history" in attempt.system_attrs:
        attempt.system_attrs["retry_history"] = list(attempt.system_attrs["retry_history"])
    return attempt


def stale_sweep_due(study: optuna.Study, config: Config, now: float | None = None) -> bool:
    """Is it this worker's turn to look for stale trials? One sweep per `heartbeat_s` for the
    whole study, whoever comes first, so the sweeps (each a listing of the RUNNING trials) do
    not multiply with workers x trials. Two workers may both sweep: failing a trial is atomic."""
    now = time.time() if now is None else now
    period = config.section("search")["heartbeat_s"]
    storage, key = storage_of(study), study_key(study)
    if now - float(storage.get_study_system_attrs(key).get(STALE_SWEEP_AT, 0.0)) < period:
        return False
    storage.set_study_system_attr(key, STALE_SWEEP_AT, now)
    return True


def recover_stale_trials(study: optuna.Study, config: Config) -> list[int]:
    """Fail RUNNING trials whose worker is gone and enqueue them again; their numbers."""
    if liveness.uses_optuna_heartbeat(storage_of(study)):
        before = {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(states=(TrialState.FAIL,))}
        return sorted(before & after)
    recovered = []
    stale_after = config.section("search")["stale_after_s"]
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        reason = liveness.stale_reason(trial, stale_after)
        if reason and fail_and_retry(study, trial, f"worker lost: {reason}"):
            log.warning("trial %d: %s; marked FAILED and enqueued again", trial.number, reason)
            recovered.append(trial.number)
    return recovered


# ---------------------------------------------------------------- trials and the objective


def trial_seed(study_seed: int, number: int) -> int:
    """A trial's training seed: reproducible from the study seed and the trial number."""
    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_of(config: Config, trial: FrozenTrial) -> int:
    """The seed a trial trains with: its first attempt's, so a re-run (after a lost worker or
    an interruption) resumes the very run it replaces, and the report's reproduce command and
    the final retrain use the seed the trial really had."""
    attempts = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return trial_seed(config.section("search")["seed"], attempts[0] if attempts else trial.number)


def objective_sign(config: Config) -> int:
    """+1 if the (first) objective is maximised, -1 if minimised: `sign * value` grows as a
    trial gets better, whichever the direction."""
    return 1 if config.section("search")["direction"] == "maximize" else -1


def best_complete(config: Config, trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best complete trial (by the first objective for a Pareto sweep), if any."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    sign = objective_sign(config)
    return max(complete, key=lambda t: sign * t.values[0])


def best_trial(config: Config) -> FrozenTrial:
    """The trial to retrain or scale (number, params, seed_of)."""
    best = best_complete(config, load_study(config).get_trials(deepcopy=False))
    if best is None:
        raise UserError(f"{config.origin}: study {config.name!r} has no complete trial to "
                        "retrain (see `hpcdl status`)")
    return best
