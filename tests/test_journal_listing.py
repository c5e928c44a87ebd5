"""hpcdl/journal_listing.py against Optuna's own JournalStorage on the same real journal, with
real writer processes: every listing (each state filter) holds the same trials in the same
order, as trials are created, enqueued, reported, finished out of order and failed."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import random
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from hpcdl.journal_listing import IndexedJournalStorage
from hpcdl.journal_lock import FairOpenLock

FILTERS = [None, (), (TrialState.COMPLETE,), (TrialState.COMPLETE, TrialState.PRUNED),
           (TrialState.FAIL,), (TrialState.RUNNING,), (TrialState.WAITING,),
           (TrialState.RUNNING, TrialState.WAITING), (TrialState.COMPLETE, TrialState.RUNNING),
           tuple(TrialState)]
ENDINGS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, None)  # None: left running


def storages(journal: Path) -> tuple[IndexedJournalStorage, JournalStorage]:
    return (IndexedJournalStorage(JournalFileBackend(str(journal), FairOpenLock(str(journal)))),
            JournalStorage(JournalFileBackend(str(journal), FairOpenLock(str(journal)))))


def summary(trials: list[optuna.trial.FrozenTrial]) -> list[tuple]:
    return [(t.number, t.state, t.params, t.intermediate_values, t.system_attrs, t.values)
            for t in trials]


def assert_same_listings(ours: IndexedJournalStorage, optunas: JournalStorage,
                         study_id: int) -> None:
    for states in FILTERS:
        expected = summary(optunas.get_all_trials(study_id, deepcopy=False, states=states))
        assert summary(ours.get_all_trials(study_id, deepcopy=False, states=states)) == \
            expected, states


def write_trials(journal: str, seed: int, trials: int) -> None:
    """A worker: asks, reports, and ends its trials in random states, some after a later
    trial of its own has ended (two trials open at once), some never."""
    rng = random.Random(seed)
    study = optuna.load_study(study_name="s", storage=JournalStorage(
        JournalFileBackend(journal, FairOpenLock(journal))))
    open_trials: list[optuna.Trial] = []
    for _ in range(trials):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.report(rng.random(), 0)
        open_trials.append(trial)
        if rng.random() < 0.3:
            study.enqueue_trial({"x": 0.5})
        if len(open_trials) == 2 or rng.random() < 0.5:
            ending = rng.choice(ENDINGS)
            ended = open_trials.pop(rng.randrange(len(open_trials)))
            if ending is not None:
                study.tell(ended, rng.random() if ending == TrialState.COMPLETE else None,
                           state=ending)


def test_listings_equal_optunas_while_writers_run(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    ours, optunas = storages(journal)
    study_id = ours.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    writers = [mp.get_context("fork").Process(target=write_trials, args=(str(journal), s, 60))
               for s in range(3)]
    for w in writers:
        w.start()
    # Holding the journal's lock, no writer appends: both storages read the same log.
    lock, looks, seen = FairOpenLock(str(journal)), 0, set()
    while any(w.is_alive() for w in writers) or looks == 0:
        lock.acquire()
        try:
            assert_same_listings(ours, optunas, study_id)  # the index grows a little each look
            seen |= {t.state for t in optunas.get_all_trials(study_id, deepcopy=False)}
        finally:
            lock.release()
        looks += 1
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert_same_listings(ours, optunas, study_id)
    assert seen == set(TrialState), seen  # every kind of trial was listed
    assert looks > 5


def test_a_trial_finishing_after_newer_ones_keeps_its_place(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    ours, optunas = storages(journal)
    study = optuna.create_study(study_name="s", storage=ours)
    trials = [study.ask() for _ in range(5)]
    for number, value in ((3, 0.3), (1, 0.1)):
        study.tell(trials[number], value)
    assert_same_listings(ours, optunas, study._study_id)
    study.tell(trials[0], state=TrialState.PRUNED)  # the oldest, after the index saw 1 and 3
    study.tell(trials[2], state=TrialState.FAIL)
    assert_same_listings(ours, optunas, study._study_id)
    listed = ours.get_all_trials(study._study_id, deepcopy=False)
    assert [t.number for t in listed] == [0, 1, 2, 3, 4]
    assert listed[4].state == TrialState.RUNNING


def test_copies_pickling_and_deleted_studies(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    ours, _ = storages(journal)
    study = optuna.create_study(study_name="s", storage=ours)
    study.tell(study.ask(), 1.0)
    copied = ours.get_all_trials(study._study_id)
    copied[0].user_attrs["changed"] = True
    assert ours.get_all_trials(study._study_id)[0].user_attrs == {}
    revived = pickle.loads(pickle.dumps(ours))  # as Optuna's own: replays the journal afresh
    assert summary(revived.get_all_trials(study._study_id)) == summary(copied)
    ours.delete_study(study._study_id)
    with pytest.raises(KeyError):
        ours.get_all_trials(study._study_id)
