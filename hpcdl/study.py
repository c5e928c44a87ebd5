"""Optuna: storage from URL, sampler/pruner, search space, and the rank-synchronised worker loop.

Only rank 0 of a worker talks to the study. It asks for a trial, broadcasts the params, and
after each epoch reports the rank-averaged metric and broadcasts the prune decision, so every
rank stops at the same epoch. W workers share one study and one budget: `search.n_trials`
finished trials in the whole study, not per worker.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from hpcdl import liveness, logs, parallel, train
from hpcdl.config import Config
from hpcdl.errors import ConfigError, UserError

log = logging.getLogger("hpcdl.study")
# The retry callback and its helpers are marked experimental since Optuna 2.8; we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FAIL_REASON = "hpcdl:fail_reason"
SURPLUS = "hpcdl:surplus"
TRIAL_FILE = "hpcdl:trial_file"
MAX_RETRIES = 3


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
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            # The open(O_CREAT|O_EXCL) lock works on NFS, where symlink/flock locks may not.
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
            return optuna.storages.JournalStorage(backend)
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
        raise ConfigError(f"{config.origin}: storage: cannot open {url!r}: {exc}") from exc
    raise ConfigError(
        f"{config.origin}: storage: {url!r} is not journal, sqlite:///FILE, "
        "postgresql://..., mysql://... or grpc://HOST:PORT"
    )


def _open_rdb(
    url: str, search: Mapping[str, Any], retry: RetryHeartbeatStaleTrialCallback
) -> BaseStorage:
    """RDBStorage with Optuna's heartbeat. Workers starting together race to create the
    tables (PostgreSQL: duplicate key on CREATE TYPE), so a failed first open is retried."""

    def connect() -> BaseStorage:
        return optuna.storages.RDBStorage(
            url,
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
    config: Config, worker_id: int = 0, storage: BaseStorage | None = None
) -> optuna.Study:
    """Create or load the sweep's study; refuse one created for other objectives."""
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
    if "config" not in study.user_attrs:
        study.set_user_attr("config", config.as_dict())
    return study


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
    if spent.failed >= search["n_trials"]:
        return f"{spent.failed} trials failed: giving up"
    if any(t.state == TrialState.WAITING for t in trials):
        return None  # enqueued or re-queued trials are claimed budget that still needs a worker
    if spent.claimed >= search["n_trials"]:
        return f"budget of {search['n_trials']} trials claimed"
    return None


def is_surplus(study: optuna.Study, trial: Trial, config: Config) -> bool:
    """Did other workers claim the whole budget between our check and our ask?

    Trial numbers are handed out atomically, so the lowest numbers win: a trial is surplus if
    the trials numbered below it already claim n_trials.
    """
    search = config.section("search")
    trials = study.get_trials(deepcopy=False)
    earlier = [t for t in trials if t.number < trial.number]
    claimed = budget(earlier, search["count_failed"], replaced_numbers(trials)).claimed
    return claimed >= search["n_trials"]


# ---------------------------------------------------------------- recovery


def fail_and_retry(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Mark a trial FAILED with `reason` and enqueue its params again (at most MAX_RETRIES).

    Returns False if another worker got there first (the state change is atomic).
    """
    storage = study._storage
    try:
        storage.set_trial_system_attr(trial_id, FAIL_REASON, reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    failed = storage.get_trial(trial_id)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)(
        study, failed
    )
    return True


def recover_stale_trials(study: optuna.Study, config: Config) -> list[int]:
    """Fail RUNNING trials whose worker is gone and enqueue them again; their numbers."""
    if liveness.uses_optuna_heartbeat(study._storage):
        before = {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(states=(TrialState.FAIL,))}
        return sorted(before & after)
    recovered = []
    stale_after = config.section("search")["stale_after_s"]
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        reason = liveness.stale_reason(trial, stale_after)
        if reason and fail_and_retry(study, trial._trial_id, f"worker lost: {reason}"):
            log.warning("trial %d: %s; marked FAILED and enqueued again", trial.number, reason)
            recovered.append(trial.number)
    return recovered


# ---------------------------------------------------------------- the worker


def trial_seed(study_seed: int, number: int) -> int:
    """A trial's training seed: reproducible from the study seed and the trial number."""
    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0] & 0x7FFFFFFF)


def objective_values(config: Config, result: train.RunResult) -> list[float]:
    """Best epoch's value of the metric (in its direction); plus the second objective."""
    search = config.section("search")
    curve = result.epochs[search["metric"]]
    best = max(curve) if search["direction"] == "maximize" else min(curve)
    values = [best]
    second = search["second_objective"]
    if second:
        metric = second["metric"]
        if metric == "n_params":
            values.append(float(result.n_params))
        elif metric == "wall_seconds":
            values.append(result.wall_seconds)
        else:
            values.append(float(np.median(result.epochs[metric])))
    return values


@dataclass
class Plan:
    """What rank 0 tells every rank before a trial (or None: the sweep is over)."""

    number: int
    params: dict[str, Any]
    seed: int
    resume_from: int | None


class Worker:
    """One worker: a multi-rank job pulling trials from the shared study until the budget ends."""

    def __init__(self, config: Config, worker_id: int) -> None:
        self.config = config
        self.worker_id = worker_id
        self.ranks = parallel.init(config.params["intra_op_threads"])
        logs.configure(self.ranks.rank, self.ranks.size, self.ranks.host)
        self.study: optuna.Study | None = None
        self.trial: Trial | None = None
        self.study = parallel.on_root(lambda: open_study(config, worker_id), "worker.open")

    def next_plan(self) -> Plan | None:
        """Rank 0: recover stale trials, check the budget, ask. Others: None."""
        assert self.study is not None
        recover_stale_trials(self.study, self.config)
        while (over := budget_left(self.study, self.config)) is None:
            trial = self.study.ask()
            storage = self.study._storage
            for key, value in liveness.owner_attrs(self.worker_id, self.ranks.job_id).items():
                if key != liveness.HEARTBEAT or not liveness.uses_optuna_heartbeat(storage):
                    storage.set_trial_system_attr(trial._trial_id, key, value)
            if is_surplus(self.study, trial, self.config):
                storage.set_trial_system_attr(trial._trial_id, SURPLUS, True)
                storage.set_trial_system_attr(
                    trial._trial_id, FAIL_REASON, "surplus: other workers claimed the budget first"
                )
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            params = suggest(trial, self.config.section("search")["space"])
            frozen = storage.get_trial(trial._trial_id)
            resume_from = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
            trial_file = self.config.trial_file(trial.number)
            trial.set_user_attr(TRIAL_FILE, str(trial_file))
            self.trial = trial
            if resume_from is not None:
                self._adopt_checkpoint(resume_from, trial.number)
            seed = trial_seed(
                self.config.section("search")["seed"],
                resume_from if resume_from is not None else trial.number,
            )
            return Plan(trial.number, params, seed, resume_from)
        log.info("worker %d: no more trials (%s)", self.worker_id, over)
        return None

    def _adopt_checkpoint(self, old: int, new: int) -> None:
        """A re-run continues from the failed trial's last finished epoch."""
        source = train.checkpoint_dir(self.config.trial_file(old))
        if source.is_dir():
            target = train.checkpoint_dir(self.config.trial_file(new))
            shutil.rmtree(target, ignore_errors=True)
            source.rename(target)  # only one re-run adopts it: the retry is atomic
            log.info("trial %d re-runs trial %d from its checkpoint", new, old)
        else:
            log.info("trial %d re-runs trial %d from the start (no checkpoint)", new, old)

    def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Every rank: rank 0 reports the epoch and decides; all ranks get the same decision."""
        prune = False
        if self.ranks.is_root and len(directions(self.config)) == 1:
            assert self.trial is not None
            value = metrics[self.config.section("search")["metric"]]
            if math.isfinite(value):
                self.trial.report(value, epoch + 1)
                prune = self.trial.should_prune()
        return bool(parallel.broadcast_object(prune, f"prune.{epoch}"))

    def run_trial(self, plan: Plan) -> train.RunResult | None:
        """Train the plan's params on all ranks; rank 0 tells the study how it ended."""
        config = self.config.with_params({**plan.params, "seed": plan.seed})
        out = self.config.trial_file(plan.number)
        attrs = {
            "study": self.config.name,
            "trial_number": plan.number,
            "worker_id": self.worker_id,
            "resumed_from_trial": plan.resume_from,
        }
        if self.ranks.is_root:
            log.info("trial %d: %s", plan.number, plan.params)
        try:
            if self.ranks.is_root:
                assert self.study is not None and self.trial is not None
                with liveness.heartbeat(
                    self.study._storage,
                    self.trial._trial_id,
                    self.config.section("search")["heartbeat_s"],
                ):
                    result = train.train(config, out, on_epoch=self.report, run_attrs=attrs)
            else:
                result = train.train(config, out, on_epoch=self.report, run_attrs=attrs)
        except UserError as exc:  # raised alike on every rank, before any collective
            log.error("trial %d failed: %s", plan.number, exc)
            if self.ranks.is_root:
                self._tell(TrialState.FAIL, reason=f"error: {exc}")
            return None
        if self.ranks.is_root:
            self._tell_result(result)
        return result

    def _tell_result(self, result: train.RunResult) -> None:
        assert self.study is not None and self.trial is not None
        reason = result.stop_reason
        if reason == train.INTERRUPTED:
            fail_and_retry(
                self.study,
                self.trial._trial_id,
                "interrupted (SIGTERM/SIGUSR1): re-run from its checkpoint",
            )
        elif reason == train.PRUNED:
            self._tell(TrialState.PRUNED)
            log.info("trial %d: pruned after %d epochs", self.trial.number, result.n_epochs)
        elif reason.startswith("failed"):
            self._tell(TrialState.FAIL, reason=reason)
            log.warning("trial %d: %s", self.trial.number, reason)
        else:
            self.study.tell(self.trial, objective_values(self.config, result))
            log.info(
                "trial %d: %s, value %s",
                self.trial.number,
                reason,
                objective_values(self.config, result),
            )

    def _tell(self, state: TrialState, reason: str | None = None) -> None:
        assert self.study is not None and self.trial is not None
        if reason:
            self.study._storage.set_trial_system_attr(self.trial._trial_id, FAIL_REASON, reason)
        self.study.tell(self.trial, state=state)

    def run(self) -> str:
        """Pull trials until the budget is spent; returns 'done' or 'interrupted'."""
        while True:
            plan = self.next_plan() if self.ranks.is_root else None
            plan = parallel.broadcast_object(plan, "worker.plan")
            if plan is None:
                return "done"
            result = self.run_trial(plan)
            if result is not None and result.stop_reason == train.INTERRUPTED:
                return "interrupted"


def best_complete(config: Config, trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best complete trial (by the first objective for a Pareto sweep), if any."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    sign = 1 if config.section("search")["direction"] == "maximize" else -1
    return max(complete, key=lambda t: sign * t.values[0])


def best_trial(config: Config) -> tuple[int, dict[str, Any]]:
    """The trial to retrain or scale: its number and params."""
    best = best_complete(config, load_study(config).get_trials(deepcopy=False))
    if best is None:
        raise UserError(f"{config.origin}: study {config.name!r} has no complete trial to "
                        "retrain (see `hpcdl status`)")
    return best.number, dict(best.params)
