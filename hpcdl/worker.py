"""The rank-synchronised worker loop, and the best trial's retrain.

Only rank 0 of a worker talks to the study (study.py). It recovers stale trials, asks for a
trial, broadcasts the params, and after each epoch reports the rank-averaged metric and
broadcasts the prune decision, so every rank stops at the same epoch; at the end it tells the
study how the trial ended. A re-run of a failed or interrupted trial continues from that
trial's checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import Trial, TrialState

from hpcdl import data, liveness, logs, models, parallel, store, study, train
from hpcdl.config import Config
from hpcdl.errors import ConfigError, UserError

log = logging.getLogger("hpcdl.worker")


class WorkerOutcome(StrEnum):
    """How a worker ended: the budget is spent, or it was interrupted (requeue it)."""

    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"  # the budget is spent and no trial of the study completed


# params that decide whether the model fits the images: searched, a trial checks them itself
ARCHITECTURE_PARAMS = {"family", "blocks"}


def check_before_the_first_trial(config: Config, ranks: int) -> None:
    """What depends only on the config and the dataset, checked once, alike on every rank and
    before the study is opened: a problem here would fail every trial the same way. What a
    trial's params decide (a searched batch size or depth) fails that trial only."""
    info = data.dataset_info(config.dataset_file)
    data.check_labels(info)
    train.check_metrics_recorded(config, info)
    searched = set(config.section("search")["space"])
    if "batch_size" not in searched:
        train.check_batch_fits(config, info, ranks)
    if not searched & ARCHITECTURE_PARAMS:
        try:
            models.check_architecture(config.params, info.sample_shape)
        except ConfigError as exc:
            raise ConfigError(f"{config.origin}: {exc}") from None


def objective_values(config: Config, result: train.RunResult) -> list[float]:
    """Best epoch's value of the metric (in its direction); plus the second objective."""
    search = config.section("search")
    sign = study.objective_sign(config)
    values = [max(result.epochs[search["metric"]], key=lambda value: sign * value)]
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

    def __init__(self, config: Config, worker_id: int, continue_changed: bool = False) -> None:
        self.config = config
        self.worker_id = worker_id
        self.ranks = parallel.init(config.params["intra_op_threads"])
        logs.configure(self.ranks.rank, self.ranks.size, self.ranks.host)
        check_before_the_first_trial(config, self.ranks.size)
        self.trial: Trial | None = None
        self.nothing_completed = False  # rank 0: the sweep ended without one complete trial
        self.study: optuna.Study | None = parallel.on_root(
            lambda: study.open_study(config, worker_id, continue_changed=continue_changed),
            "worker.open")

    def next_plan(self) -> Plan | None:
        """Rank 0: recover stale trials (on the study's period), check the budget, ask.
        Others: None."""
        assert self.study is not None
        if study.stale_sweep_due(self.study, self.config):
            study.recover_stale_trials(self.study, self.config)
        while (over := self._budget_left()) is None:
            trial = self.study.ask()
            self._claim(trial)
            if study.is_surplus(self.study, trial, self.config):
                self._tell(trial, TrialState.FAIL,
                           "surplus: other workers claimed the budget first", surplus=True)
                continue
            params = study.suggest(trial, self.config.section("search")["space"])
            # a re-run resumes from the attempt before it (which may itself be a re-run that
            # adopted the first attempt's checkpoint) and keeps the first attempt's seed
            frozen = study.storage_of(self.study).get_trial(study.trial_id(trial))
            attempts = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
            resume_from = attempts[-1] if attempts else None
            trial.set_user_attr(study.TRIAL_FILE, str(self.config.trial_file(trial.number)))
            self.trial = trial
            if resume_from is not None:
                self._adopt_checkpoint(resume_from, trial.number)
            return Plan(trial.number, params, study.seed_of(self.config, frozen), resume_from)
        log.info("worker %d: no more trials (%s)", self.worker_id, over)
        self.nothing_completed = study.nothing_completed(self.study)
        if self.nothing_completed:
            log.error("worker %d: no trial of study %r completed; see `hpcdl status`",
                      self.worker_id, self.config.name)
        return None

    def _budget_left(self) -> str | None:
        """Why the sweep is over, or None. Before saying it is, one sweep off the period: a
        dead worker's RUNNING trial counts as claimed, and must not be left behind."""
        assert self.study is not None
        over = study.budget_left(self.study, self.config)
        if over is not None and study.recover_stale_trials(self.study, self.config):
            over = study.budget_left(self.study, self.config)
        return over

    def _claim(self, trial: Trial) -> None:
        """Record this worker as the trial's owner (host, pid, job, heartbeat)."""
        assert self.study is not None
        storage = study.storage_of(self.study)
        for key, value in liveness.owner_attrs(self.worker_id, self.ranks.job_id).items():
            if key != liveness.HEARTBEAT or not liveness.uses_optuna_heartbeat(storage):
                storage.set_trial_system_attr(study.trial_id(trial), key, value)

    def _adopt_checkpoint(self, old: int, new: int) -> None:
        """A re-run continues from the failed trial's last finished epoch."""
        # only one re-run adopts it: the retry is atomic
        if store.move_checkpoint(self.config.trial_file(old), self.config.trial_file(new)):
            log.info("trial %d re-runs trial %d from its checkpoint", new, old)
        else:
            log.info("trial %d re-runs trial %d from the start (no checkpoint)", new, old)

    def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Every rank: rank 0 reports the epoch and decides; all ranks get the same decision."""
        prune = self.ranks.is_root and self.decide_prune(epoch, metrics)
        return bool(parallel.broadcast_object(prune, f"prune.{epoch}"))

    def decide_prune(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Rank 0: report the epoch's metric to the study (one write) and ask the pruner."""
        if len(study.directions(self.config)) != 1:
            return False
        assert self.trial is not None
        value = metrics[self.config.section("search")["metric"]]
        if not math.isfinite(value):
            return False
        self.trial.report(value, epoch + 1)
        return self.trial.should_prune()

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
                    study.storage_of(self.study),
                    study.trial_id(self.trial),
                    self.config.section("search")["heartbeat_s"],
                ):
                    result = train.train(config, out, on_epoch=self.report, run_attrs=attrs)
            else:
                result = train.train(config, out, on_epoch=self.report, run_attrs=attrs)
        except UserError as exc:  # raised alike on every rank, before any collective
            log.error("trial %d failed: %s", plan.number, exc)
            if self.ranks.is_root:
                assert self.trial is not None
                self._tell(self.trial, TrialState.FAIL, f"error: {exc}")
            return None
        if self.ranks.is_root:
            self._tell_result(result)
        return result

    def _tell_result(self, result: train.RunResult) -> None:
        """Rank 0: the study learns how the trial ended (an interrupted one is run again)."""
        assert self.study is not None and self.trial is not None
        reason = result.stop_reason
        if reason == train.StopReason.INTERRUPTED:
            study.fail_and_retry(
                self.study, self.trial, "interrupted (SIGTERM/SIGUSR1): re-run from its checkpoint"
            )
        elif reason == train.StopReason.PRUNED:
            self._tell(self.trial, TrialState.PRUNED)
            log.info("trial %d: pruned after %d epochs", self.trial.number, result.n_epochs)
        elif reason.failed:
            self._tell(self.trial, TrialState.FAIL, reason.value)
            log.warning("trial %d: %s", self.trial.number, reason)
        else:
            values = objective_values(self.config, result)
            self.study.tell(self.trial, values)
            log.info("trial %d: %s, value %s", self.trial.number, reason, values)

    def _tell(self, trial: Trial, state: TrialState, reason: str | None = None,
              surplus: bool = False) -> None:
        """End `trial` in `state`, recording why it failed (and whether it was surplus)."""
        assert self.study is not None
        storage = study.storage_of(self.study)
        if surplus:
            storage.set_trial_system_attr(study.trial_id(trial), study.SURPLUS, True)
        if reason:
            storage.set_trial_system_attr(study.trial_id(trial), study.FAIL_REASON, reason)
        self.study.tell(trial, state=state)

    def run(self) -> WorkerOutcome:
        """Pull trials until the budget is spent, or until a trial is interrupted."""
        while True:
            plan = self.next_plan() if self.ranks.is_root else None
            plan = parallel.broadcast_object(plan, "worker.plan")
            if plan is None:
                failed = parallel.broadcast_object(self.nothing_completed, "worker.failed")
                return WorkerOutcome.FAILED if failed else WorkerOutcome.DONE
            result = self.run_trial(plan)
            if result is not None and result.stop_reason == train.StopReason.INTERRUPTED:
                return WorkerOutcome.INTERRUPTED


def retrain_best(config: Config) -> train.RunResult:
    """The best trial's params trained on train+val with its seed, on every rank: the sweep's
    model (best/model.keras) and its run file (best/run.h5)."""
    ranks = parallel.init(config.params["intra_op_threads"])
    logs.configure(ranks.rank, ranks.size, ranks.host)
    def best() -> tuple[int, dict[str, Any], int]:
        trial = study.best_trial(config)
        return trial.number, trial.params, study.seed_of(config, trial)

    number, params, seed = parallel.broadcast_object(
        parallel.on_root(best, "final.best"), "final.params")
    if ranks.is_root:
        log.info("retraining trial %d's params on train+val: %s", number, params)
    return train.train(config.with_params({**params, "seed": seed}), config.paths.best_run,
                       run_attrs={"study": config.name, "best_trial": number},
                       fit_on_val=True, save_model=config.paths.best_model)
