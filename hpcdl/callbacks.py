"""The Keras callbacks of a training run, and the signal flag the stop agreement reads.

Keras is imported inside the factories: importing train (the CLI, the worker) must not load
TensorFlow before `parallel.init` has set its thread pools.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from hpcdl import parallel

STOP_CHECK_BATCHES = 50
PROGRESS_SECONDS = 1.0  # how often rank 0's progress bar reads the metrics and redraws
BAR_FORMAT = ("{desc} {percentage:3.0f}% {n_fmt}/{total_fmt} "
              "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")

# Called on every rank after each epoch with (epoch, Keras' logs, seconds the epoch trained);
# returns why the run stops after this epoch, or None to go on.
EpochEndHandler = Callable[[int, Mapping[str, float], float], str | None]


class StopRequest:
    """Set by SIGTERM / SIGUSR1 (Slurm's time-limit warning); checked after every batch."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def stop_agreement(stop: StopRequest) -> Any:
    """A callback that stops all ranks after the same batch once any rank has been signalled."""
    from tensorflow import keras

    class AgreeOnStop(keras.callbacks.Callback):
        """Stop all ranks after the same batch once any rank has been signalled."""

        stopped = False

        def __init__(self) -> None:
            super().__init__()
            # This hook reads no metrics: without this flag Keras would copy the logs to NumPy
            # after every batch, a sync that cost ~20 % of an epoch (benchmarks/RESULTS.md).
            self._supports_tf_logs = True

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            # MPI agreement every STOP_CHECK_BATCHES batches: every batch, its busy-wait cost
            # a large share of a CPU epoch; RunProgress checks at every epoch's end too.
            if (batch + 1) % STOP_CHECK_BATCHES == 0 and parallel.any_rank(stop.requested):
                self.stopped = True
                self.model.stop_training = True

    return AgreeOnStop()


def progress_bar(where: str, epochs: int, steps: int) -> Any:
    """Rank 0's progress bar, reading the metrics once a second. Keras' own bar (verbose=1)
    copies them to NumPy after every batch, a sync per step; and under mpirun every rank's
    stdout is a pseudo-terminal, so that bar also ran in every batch job's log."""
    from tensorflow import keras
    from tqdm import tqdm

    class EpochProgress(keras.callbacks.Callback):
        """One bar per epoch, named after the rank; the epoch's log line stays, the bar not."""

        def __init__(self) -> None:
            super().__init__()
            self._supports_tf_logs = True  # logs stay tensors; read only when redrawn
            self.bar: Any = None
            self.drawn = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            # mpirun's pseudo-terminal reports a 0 x 0 screen, on which tqdm draws nothing
            columns, lines = shutil.get_terminal_size(fallback=(120, 24))
            self.bar = tqdm(total=steps, desc=f"[{where}] epoch {epoch + 1}/{epochs}",
                            unit="step", leave=False, mininterval=PROGRESS_SECONDS,
                            file=sys.stdout, ncols=columns, nrows=lines, bar_format=BAR_FORMAT)
            self.drawn = time.monotonic()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            now = time.monotonic()
            if now - self.drawn >= PROGRESS_SECONDS:
                self.drawn = now
                metrics = {k: f"{float(v):.4f}" for k, v in (logs or {}).items()}
                self.bar.set_postfix(metrics, refresh=False)
                self.bar.update(batch + 1 - self.bar.n)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.bar.close()

    return EpochProgress()


def epoch_end(handler: EpochEndHandler) -> Any:
    """A callback that times each epoch's training and hands it to `handler`; it stops the fit
    when that returns a stop reason (kept in its `reason`)."""
    from tensorflow import keras

    class EpochEnd(keras.callbacks.Callback):
        """Times each epoch's training and hands it to the handler."""

        reason: str | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seconds = time.perf_counter() - self.began
            self.reason = handler(epoch, logs or {}, seconds)
            if self.reason is not None:
                self.model.stop_training = True

    return EpochEnd()
