"""Benchmark 9's job as the peers (Ray Tune, KerasTuner) run it: hpcdl's dataset file, hpcdl's
own model builder (imported from the repository: hpcdl.models needs only TensorFlow), the
demo's space, batch size and optimizer, and one event line per trained epoch.

Runs inside a peer venv (benchmarks/.venv-*), never the runtime's; `import hpcdl` selects
Keras 2 (tf-keras) as in hpcdl's own processes, so both sides train with the same Keras.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import hpcdl  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads)
from hpcdl import models

# configs/demo.yaml's search space; everything else at hpcdl's defaults (configs/schema.yaml)
SPACE = {
    "width": (32, 512),  # int, log
    "depth": (1, 3),  # int
    "learning_rate": (1e-4, 1e-2),  # float, log
    "dropout": (0.0, 0.5),  # float
}
BATCH_SIZE = 128
MODEL_DEFAULTS = {"family": "mlp", "width_factor": 1.0, "activation": "relu",
                  "batch_norm": False}


def limit_threads() -> None:
    """One TensorFlow thread per trial, as hpcdl's `intra_op_threads: 1` gives each rank."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # a reused process (Ray's reuse_actors): set by its first trial
        pass


def load(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of hpcdl's dataset file, scaled as hpcdl scales uint8 images (/255)."""
    with h5py.File(path, "r") as handle:
        x, y = handle[f"{split}/x"][...], handle[f"{split}/y"][...]
    return (x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x), y


def build(params: dict[str, Any], input_shape: tuple[int, ...], n_classes: int) -> Any:
    """hpcdl's mlp for these params, compiled as hpcdl compiles it at 1 rank (Adam, lr as is)."""
    from tensorflow import keras

    model = models.build_model({**MODEL_DEFAULTS, **params}, input_shape, n_classes)
    model.compile(optimizer=keras.optimizers.Adam(params["learning_rate"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class Events:
    """Appends one JSON line per trained epoch to the run's event file (shared by the trial
    processes; a line is one small O_APPEND write)."""

    def __init__(self, path: str | os.PathLike[str], trial: str) -> None:
        self.path, self.trial = Path(path), trial

    def write(self, **fields: Any) -> None:
        line = json.dumps({"trial": self.trial, "t": time.time(), **fields}) + "\n"
        with self.path.open("a") as handle:
            handle.write(line)


def epoch_logger(events: Events, report: Any = None) -> Any:
    """A Keras callback: per epoch, its training seconds (begin to validation start) and val
    accuracy to `events`, then `report(epoch, logs)` (the tuner's own report) if given."""
    from tensorflow import keras

    class EpochLogger(keras.callbacks.Callback):
        last_epoch = 0

        def __init__(self) -> None:
            super().__init__()
            self.events = events

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.began, self.trained = time.perf_counter(), None

        def on_test_begin(self, logs: Any = None) -> None:
            self.trained = time.perf_counter() - self.began

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seconds = self.trained if self.trained is not None else (
                time.perf_counter() - self.began)
            self.last_epoch = epoch + 1
            events.write(epoch=epoch + 1, val_accuracy=float(logs["val_accuracy"]),
                         train_seconds=seconds)
            if report is not None:
                report(epoch + 1, logs)

    return EpochLogger()


def record_test(model: Any, test: tuple[np.ndarray, np.ndarray], events: Events,
                epochs: int) -> None:
    """A trial that trained to the full budget is evaluated on test, as hpcdl evaluates every
    trial that trains to its end."""
    result = model.evaluate(*test, batch_size=512, verbose=0, return_dict=True)
    events.write(test_accuracy=float(result["accuracy"]), epochs=epochs)
