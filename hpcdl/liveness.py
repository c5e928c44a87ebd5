"""Who runs a trial, and is it still alive: our heartbeat for storages that have none.

Optuna's JournalStorage (and the gRPC proxy in front of it) keep no heartbeat, so a worker
killed with SIGKILL leaves its trial RUNNING forever. Rank 0 of each worker records its host,
pid and Slurm job id in the trial's system attributes and refreshes a timestamp from a thread;
a trial whose owner is gone (dead pid on this host, or a heartbeat older than the limit) is stale.
RDB storages use Optuna's own heartbeat instead (record_heartbeat), via the same thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from optuna.storages import BaseStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

HOST = "hpcdl:host"
PID = "hpcdl:pid"
JOB = "hpcdl:slurm_job_id"
WORKER = "hpcdl:worker_id"
HEARTBEAT = "hpcdl:heartbeat"
# what owner_attrs() writes: they describe one attempt, never the trial that re-runs it
OWNER_KEYS = (HOST, PID, JOB, WORKER, HEARTBEAT)

log = logging.getLogger("hpcdl.liveness")


def owner_attrs(worker_id: int, job_id: str | None) -> dict[str, Any]:
    """What identifies this worker process (rank 0) as the owner of a trial."""
    return {
        HOST: socket.gethostname(),
        PID: os.getpid(),
        JOB: job_id,
        WORKER: worker_id,
        HEARTBEAT: time.time(),
    }


def uses_optuna_heartbeat(storage: BaseStorage) -> bool:
    """RDB storages created with a heartbeat interval do their own liveness."""
    return is_heartbeat_enabled(storage)


@contextmanager
def heartbeat(storage: BaseStorage, trial_id: int, interval_s: float) -> Iterator[None]:
    """Refresh the trial's heartbeat every interval_s seconds while the block runs."""
    stop = threading.Event()
    optuna_heartbeat = uses_optuna_heartbeat(storage)

    def beat() -> None:
        failing = False  # a storage outage is one warning, not one per interval
        while not stop.wait(interval_s):
            try:
                if optuna_heartbeat:
                    storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                else:
                    storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
            except Exception as exc:  # keep beating: the storage may come back
                if not failing:
                    log.warning("trial id %d: heartbeat not recorded (%s); other workers may "
                                "take the trial for lost", trial_id, str(exc).split("\n")[0])
                failing = True
            else:
                failing = False

    if optuna_heartbeat:
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(trial: FrozenTrial, stale_after_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial's owner is considered dead, or None if it seems alive."""
    if trial.state != TrialState.RUNNING:
        return None
    attrs = trial.system_attrs
    if HEARTBEAT not in attrs:
        return None  # not ours (or created by Optuna's heartbeat path): leave it alone
    now = time.time() if now is None else now
    if attrs.get(HOST) == socket.gethostname() and not _pid_alive(int(attrs[PID])):
        return f"owner pid {attrs[PID]} on {attrs[HOST]} is gone"
    age = now - float(attrs[HEARTBEAT])
    if age > stale_after_s:
        return (
            f"no heartbeat from {attrs.get(HOST)} pid {attrs.get(PID)} "
            f"(job {attrs.get(JOB) or 'local'}) for {age:.0f}s"
        )
    return None
