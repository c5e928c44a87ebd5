"""The gRPC proxy server's cache of trial listings: every client's `get_all_trials` (each
ask, budget check and prune check of every worker) would otherwise be one read of the whole
study from the database.

A listing is served from memory for `ttl_s` seconds, and dropped at once when a trial is
created or changes state through this server, so a listing never misses a trial created or
finished before the call began (the budget's surplus check and the pruners rely on that).
Attributes and intermediate values of RUNNING trials may lag by up to `ttl_s`, the same
as if their writes had arrived that much later. Valid only while this server is the
database's one writer (`hpcdl storage serve` is: its SQLite file is opened by no one else).

With `one_writer` (SQLite behind) the server's threads write one at a time: SQLite takes one
writer anyway, and threads left to its busy handler sleep up to 100 ms between retries, which
let 16 clients' writes pile up for seconds (benchmarks/RESULTS.md, issue 21).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Container, Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState

TTL_S = 1.0


class ListingCache(BaseStorage):
    """`backend` with its trial listings cached for `ttl_s` seconds (see the module)."""

    def __init__(self, backend: BaseStorage, ttl_s: float | None = None,
                 one_writer: bool = False) -> None:
        self._backend = backend
        self._ttl_s = TTL_S if ttl_s is None else ttl_s
        self._lock = threading.Lock()
        self._writing = threading.Lock() if one_writer else contextlib.nullcontext()
        self._listings: dict[int, tuple[float, list[FrozenTrial]]] = {}
        # bumped by every change a listing must show; a read begun before it is not kept
        self._generation = 0

    def _changed(self) -> None:
        with self._lock:
            self._generation += 1
            self._listings.clear()

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        now = time.monotonic()
        with self._lock:
            cached = self._listings.get(study_id)
            generation = self._generation
        if cached is not None and now - cached[0] < self._ttl_s:
            trials = cached[1]
        else:
            trials = self._backend.get_all_trials(study_id, deepcopy=False)
            with self._lock:
                if self._generation == generation:
                    self._listings[study_id] = (now, trials)
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return [t.__deepcopy__({}) for t in trials] if deepcopy else list(trials)

    # ------------------------------------------------ writes that a listing must show at once

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        try:
            with self._writing:
                return self._backend.create_new_trial(study_id, template_trial)
        finally:
            self._changed()

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        try:
            with self._writing:
                return self._backend.set_trial_state_values(trial_id, state, values)
        finally:
            self._changed()

    def delete_study(self, study_id: int) -> None:
        try:
            with self._writing:
                self._backend.delete_study(study_id)
        finally:
            self._changed()

    # ------------------------------------------------ everything else: straight through

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        with self._writing:
            return self._backend.create_new_study(directions, study_name)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._writing:
            self._backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._writing:
            self._backend.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._backend.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._backend.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._backend.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._backend.get_all_studies()

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        with self._writing:
            self._backend.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_intermediate_value(self, trial_id: int, step: int,
                                     intermediate_value: float) -> None:
        with self._writing:
            self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._writing:
            self._backend.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._writing:
            self._backend.set_trial_system_attr(trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._backend.get_trial(trial_id)
