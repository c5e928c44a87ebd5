"""HDF5 layouts of run (trial) files and their checkpoints; atomic writes; readers.

Run file (one training run or one trial), readable with h5dump:
  attributes: format=hpcdl-run, study, trial_number, state, stop_reason, params (JSON), seed,
              ranks, hosts (JSON), versions (JSON), wall_seconds, n_params, dataset, config (JSON),
              placement (JSON: per rank in rank order, parallel.Placement: host, rank,
              local_rank, cuda_visible_devices, slurm_gpus, device, gpu),
              input (JSON: per rank, memory.InputChoice: rank, requested, mode, shard_mb,
              per_rank_mb)
  /epochs/<metric>: one value per finished epoch (loss, accuracy, val_loss, val_accuracy,
              epoch_seconds, samples_per_second, learning_rate, elapsed_seconds: wall
              seconds since the run began at the end of the epoch, validation included)
  /test/<metric>: scalars, present when the run evaluated on test
Checkpoint of a run file X: directory X.ckpt/epoch-<NNNNN>/ with the TensorFlow checkpoint of
  model and optimizer (state*) and the run file as of that epoch (history.h5); only the newest.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

RUN_FORMAT = "hpcdl-run"
JSON_ATTRS = ("params", "hosts", "versions", "config", "train_shards", "weights_sha256",
              "peak_rss_mb", "placement", "input")


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds.

    suffix: ends the temporary name, for writers that choose the format by it (Keras).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class RunRecord:
    """Everything a run file holds."""

    attrs: dict[str, Any]
    epochs: dict[str, list[float]] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)

    @property
    def n_epochs(self) -> int:
        return len(next(iter(self.epochs.values()), []))


def write_run(path: Path, record: RunRecord) -> None:
    """Write (replace) a run file atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["format"] = RUN_FORMAT
        for key, value in record.attrs.items():
            if value is None:
                continue
            handle.attrs[key] = json.dumps(value, sort_keys=True) if key in JSON_ATTRS else value
        epochs = handle.create_group("epochs")
        for metric, values in record.epochs.items():
            epochs.create_dataset(metric, data=np.asarray(values, dtype=np.float64))
        test = handle.create_group("test")
        for metric, value in record.test.items():
            test.create_dataset(metric, data=np.float64(value))


def read_run(path: Path) -> RunRecord:
    """Read a run file written by write_run."""
    with h5py.File(path, "r") as handle:
        if handle.attrs.get("format") != RUN_FORMAT:
            raise ValueError(f"{path}: not an hpcdl run file")
        attrs: dict[str, Any] = {}
        for key, value in handle.attrs.items():
            if key == "format":
                continue
            if isinstance(value, np.generic):
                value = value.item()
            attrs[key] = json.loads(value) if key in JSON_ATTRS else value
        epochs = {k: handle["epochs"][k][()].tolist() for k in handle["epochs"]}
        test = {k: float(handle["test"][k][()]) for k in handle["test"]}
    return RunRecord(attrs, epochs, test)


def placement_text(placement: list[dict[str, Any]]) -> str:
    """A run file's `placement` on one line: each rank's host and GPU (or cpu), e.g.
    "0 n3:GPU 0, 1 n3:GPU 1" (what `hpcdl status` and the report show)."""
    return ", ".join(f"{p['rank']} {p['host']}:" + (f"GPU {p['gpu']}" if p["gpu"] is not None
                                                    else "cpu") for p in placement)


# ---------------------------------------------------------------- checkpoints of a run file


def checkpoint_dir(run_file: Path) -> Path:
    """Where a run's per-epoch checkpoints live: beside its run file."""
    return run_file.with_name(run_file.name + ".ckpt")


def save_checkpoint(run_file: Path, model: Any, epoch: int, record: RunRecord) -> None:
    """Rank 0: write epoch `epoch`'s state to a temporary dir, rename it, drop older epochs."""
    import tensorflow as tf

    ckpt_dir = checkpoint_dir(run_file)
    final = ckpt_dir / f"epoch-{epoch:05d}"
    tmp = ckpt_dir / f".epoch-{epoch:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp / "state"))
    write_run(tmp / "history.h5", record)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for older in ckpt_dir.glob("epoch-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)


def load_checkpoint(run_file: Path, model: Any) -> tuple[int, dict[str, list[float]], float]:
    """Restore the newest complete epoch checkpoint; (epochs done, history, wall seconds so far)."""
    import tensorflow as tf

    ckpt_dir = checkpoint_dir(run_file)
    done = sorted(ckpt_dir.glob("epoch-*")) if ckpt_dir.is_dir() else []
    if not done:
        return 0, {}, 0.0
    latest = done[-1]
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
        str(latest / "state")
    ).expect_partial()
    record = read_run(latest / "history.h5")
    return record.n_epochs, record.epochs, float(record.attrs.get("wall_seconds", 0.0))


def drop_checkpoint(run_file: Path) -> None:
    """Forget a run's checkpoints (the run ended and will not be resumed)."""
    shutil.rmtree(checkpoint_dir(run_file), ignore_errors=True)


def move_checkpoint(source_run: Path, target_run: Path) -> bool:
    """Hand `source_run`'s checkpoints to `target_run` (a re-run); False if it has none."""
    source = checkpoint_dir(source_run)
    if not source.is_dir():
        return False
    target = checkpoint_dir(target_run)
    shutil.rmtree(target, ignore_errors=True)
    source.rename(target)
    return True


def merge_epochs(
    history: Mapping[str, list[float]], epoch: Mapping[str, float]
) -> dict[str, list[float]]:
    """Append one epoch's metrics to a history of lists."""
    merged = {k: list(v) for k, v in history.items()}
    for key, value in epoch.items():
        merged.setdefault(key, []).append(float(value))
    return merged


# ---------------------------------------------------------------- summary and scaling files
#
# Summary file (`hpcdl aggregate`):
#   attributes: format=hpcdl-summary, study, hpcdl_version, config (JSON)
#   /trials/<column>: one value per trial (the columns of summary.csv; text columns as strings)
#   /curves/<trial number>/<metric>: that trial's per-epoch curve
# Scaling file (`hpcdl scaling`):
#   attributes: format=hpcdl-scaling, params, epochs, launcher, mode
#   /ranks, /samples_per_second, /epoch_seconds, /speedup, /efficiency: one value per rank count

SUMMARY_FORMAT = "hpcdl-summary"
SCALING_FORMAT = "hpcdl-scaling"


def _check_format(path: Path, handle: h5py.File, expected: str) -> None:
    """A reader refuses a file of another layout instead of misreading it."""
    found = handle.attrs.get("format")
    if found != expected:
        raise ValueError(f"{path}: not an {expected} file (format attribute {found!r})")


def _summary_column(values: np.ndarray) -> np.ndarray:
    """Text columns as HDF5 strings (missing -> ""), numbers as float64 (missing -> NaN)."""
    if values.dtype == object:
        return np.array(
            ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
             for v in values],
            dtype=h5py.string_dtype(),
        )
    return values.astype(np.float64)


def write_summary(path: Path, attrs: Mapping[str, Any], columns: Mapping[str, np.ndarray],
                  curves: Mapping[int, Mapping[str, list[float]]]) -> None:
    """Write (replace) a summary file atomically: per-trial columns (text or numbers, None or NaN
    when missing) and every trial's curves."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs.update({"format": SUMMARY_FORMAT, **attrs})
        trials = handle.create_group("trials")
        for name, values in columns.items():
            trials[name] = _summary_column(values)
        group = handle.create_group("curves")
        for number, metrics in curves.items():
            trial = group.create_group(str(number))
            for metric, curve in metrics.items():
                trial[metric] = np.asarray(curve, dtype=np.float64)


def write_scaling(path: Path, attrs: Mapping[str, Any], columns: Mapping[str, np.ndarray]) -> None:
    """Write (replace) a scaling file atomically: one row per rank count."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs.update({"format": SCALING_FORMAT, **attrs})
        for name, values in columns.items():
            handle[name] = values


def read_scaling(path: Path) -> dict[str, np.ndarray] | None:
    """The columns of a scaling file; None when the sweep has not been measured."""
    if not path.exists():
        return None
    with h5py.File(path, "r") as handle:
        _check_format(path, handle, SCALING_FORMAT)
        return {key: handle[key][()] for key in handle}
