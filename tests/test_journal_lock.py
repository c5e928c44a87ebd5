"""hpcdl/journal_lock.py with real processes on a real file: mutual exclusion (also beside
Optuna's own lock on the same journal), waiters that keep looking, stale locks."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest
from optuna.storages.journal import JournalFileOpenLock

from conftest import write_sweep_config
from hpcdl import config, study
from hpcdl.journal_lock import FairOpenLock

INCREMENTS = 60


def count_under_lock(journal: str, kind: str) -> None:
    """Read, pause, write back + 1: lost updates unless the lock excludes every other writer."""
    lock = FairOpenLock(journal) if kind == "fair" else JournalFileOpenLock(journal)
    counter = Path(journal + ".count")
    for _ in range(INCREMENTS):
        lock.acquire()
        try:
            value = int(counter.read_text())
            time.sleep(0.0005)
            counter.write_text(str(value + 1))
        finally:
            lock.release()


@pytest.mark.parametrize("kinds", [("fair",) * 4, ("fair", "optuna", "fair", "optuna")],
                         ids=["fair", "beside-optunas-lock"])
def test_lock_excludes_every_other_writer(tmp_path: Path, kinds: tuple[str, ...]) -> None:
    journal = str(tmp_path / "study.journal")
    Path(journal + ".count").write_text("0")
    procs = [mp.get_context("fork").Process(target=count_under_lock, args=(journal, kind))
             for kind in kinds]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert int(Path(journal + ".count").read_text()) == INCREMENTS * len(procs)
    assert sorted(os.listdir(tmp_path)) == ["study.journal.count"]  # no lock file left behind


def hold_lock(journal: str, seconds: float, held: mp.synchronize.Event) -> None:
    lock = FairOpenLock(journal)
    lock.acquire()
    held.set()
    time.sleep(seconds)
    lock.release()


def sleeps_while_waiting(lock: FairOpenLock | JournalFileOpenLock, journal: str,
                         monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sleeps `lock` asks for while another process holds the lock for 2 s: long enough
    for the sleeps to grow, with margin for a loaded machine that starts the waiter late."""
    asked: list[float] = []
    real_sleep = time.sleep

    def recorded(seconds: float) -> None:
        asked.append(seconds)
        real_sleep(seconds)

    held = mp.get_context("fork").Event()
    holder = mp.get_context("fork").Process(target=hold_lock, args=(journal, 2.0, held))
    holder.start()
    assert held.wait(30)
    with monkeypatch.context() as patch:
        patch.setattr(time, "sleep", recorded)
        lock.acquire()
    lock.release()
    holder.join(30)
    return asked


def test_a_waiter_keeps_looking_as_often_as_a_newcomer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fairness comes from every waiter polling at about the same rate: the sleeps stay at
    most max_sleep_s (jittered by 1.5x) however long the wait, where Optuna's grow to 1 s."""
    journal = str(tmp_path / "study.journal")
    ours = sleeps_while_waiting(FairOpenLock(journal), journal, monkeypatch)
    optunas = sleeps_while_waiting(JournalFileOpenLock(journal), journal, monkeypatch)
    assert len(ours) > 10 and max(ours) <= 1.5 * 0.2  # the default cap, jittered
    assert max(optunas) >= 0.9  # what starved old waiters behind newcomers


def test_a_stale_lock_is_broken_after_the_grace_period(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = str(tmp_path / "study.journal")
    Path(journal + ".lock").touch()  # left by a writer killed while holding it
    lock = FairOpenLock(journal, grace_period_s=0.5)
    with caplog.at_level(logging.WARNING, logger="hpcdl.journal_lock"):
        waiter = threading.Thread(target=lock.acquire, daemon=True)  # a hang fails, not hangs
        waiter.start()
        waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert "presumably dead: removed" in caplog.text
    assert Path(journal + ".lock").exists()  # now ours
    lock.release()
    assert os.listdir(tmp_path) == []


def test_breaking_a_stale_lock_puts_back_a_newer_one(tmp_path: Path) -> None:
    """Between seeing a lock stale and moving it away, its writer may have gone and a live one
    taken the lock: that one's file must be back under the lock's name."""
    journal = str(tmp_path / "study.journal")
    live = Path(journal + ".lock")
    live.touch()
    inode = live.stat().st_ino
    FairOpenLock(journal)._break_stale((inode, live.stat().st_mtime_ns - 1))
    assert live.stat().st_ino == inode
    assert os.listdir(tmp_path) == ["study.journal.lock"]


def test_releasing_a_lock_not_held_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="did not hold it"):
        FairOpenLock(str(tmp_path / "study.journal")).release()


def test_the_journal_storage_takes_this_lock(tmp_path: Path) -> None:
    storage = study.open_storage(config.load(write_sweep_config(tmp_path)))
    assert isinstance(storage._backend._lock, FairOpenLock)  # Optuna: private
