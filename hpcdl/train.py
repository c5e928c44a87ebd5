"""One data-parallel training run: Horovod's Keras recipe plus what a sweep needs.

Every rank reads its own shard of the dataset file, trains the same model (gradients averaged
by Horovod), and evaluates its share of val/test; metrics are averaged over ranks (weighted by
shard size). Rank 0 checkpoints every finished epoch and writes the run file. Each epoch's batch
order derives from (seed, rank, epoch), so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl import __version__, data, logs, models, parallel, store
from hpcdl.config import EPOCH_METRICS, Config
from hpcdl.errors import UserError

log = logging.getLogger("hpcdl.train")

COMPLETED = "completed"
EARLY_STOPPED = "early-stopped"
PRUNED = "pruned"
INTERRUPTED = "interrupted"
FAILED_NON_FINITE = "failed: non-finite loss"
RUNNING = "running"
STOP_CHECK_BATCHES = 50
PROGRESS_SECONDS = 1.0  # how often rank 0's progress bar reads the metrics and redraws
BAR_FORMAT = ("{desc} {percentage:3.0f}% {n_fmt}/{total_fmt} "
              "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")

# A callback run on every rank after each epoch with the rank-averaged metrics; True = prune.
# It must return the same answer on every rank (study.py broadcasts rank 0's decision).
EpochHook = Callable[[int, Mapping[str, float]], bool]


@dataclass
class RunResult:
    """How a run ended and what it measured."""

    stop_reason: str
    epochs: dict[str, list[float]]
    test: dict[str, float]
    n_params: int
    wall_seconds: float
    out: Path

    @property
    def n_epochs(self) -> int:
        return len(self.epochs.get("loss", []))


def checkpoint_dir(out: Path) -> Path:
    """Where a run's per-epoch checkpoints live: beside its run file."""
    return out.with_name(out.name + ".ckpt")


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


def _make_stop_callback(stop: StopRequest) -> Any:
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
            # a large share of a CPU epoch; the epoch's end is checked in train() as well.
            if (batch + 1) % STOP_CHECK_BATCHES == 0 and parallel.any_rank(stop.requested):
                self.stopped = True
                self.model.stop_training = True

    return AgreeOnStop()


def _make_progress_callback(where: str, epochs: int, steps: int) -> Any:
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


def _make_epoch_callback(end_of_epoch: Callable[[int, Mapping[str, float], float], str | None]
                         ) -> Any:
    from tensorflow import keras

    class EpochEnd(keras.callbacks.Callback):
        """Times each epoch's training and hands it to `end_of_epoch`; stops the fit when
        that returns a stop reason (kept in `reason`)."""

        reason: str | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seconds = time.perf_counter() - self.began
            self.reason = end_of_epoch(epoch, logs or {}, seconds)
            if self.reason is not None:
                self.model.stop_training = True

    return EpochEnd()


def make_optimizer(params: Mapping[str, Any], learning_rate: float) -> Any:
    from tensorflow import keras

    name = params["optimizer"]
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=params["momentum"])
    return {
        "adam": keras.optimizers.Adam,
        "rmsprop": keras.optimizers.RMSprop,
        "nadam": keras.optimizers.Nadam,
    }[name](learning_rate)


def _normalise(x: Any) -> Any:
    import tensorflow as tf

    return tf.cast(x, tf.float32) / 255.0 if x.dtype == tf.uint8 else x


class ShardBatches:
    """This rank's training shard in memory once; per-epoch batches in a seeded order."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, rank: int):
        import tensorflow as tf

        self.x, self.y = tf.constant(x), tf.constant(y)
        self.n, self.batch_size, self.seed, self.rank = len(y), batch_size, seed, rank
        self.steps = self.n // batch_size

    def epochs(self, start: int, end: int) -> Any:
        """Batches of epochs start..end-1 in one dataset: each epoch's order depends only on
        (seed, rank, epoch), so a resumed run sees the batches an uninterrupted one would."""
        import tensorflow as tf

        orders = [
            np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.n)
            for epoch in range(start, end)
        ]
        used = self.steps * self.batch_size
        batches = np.stack([order[:used] for order in orders]).reshape(-1, self.batch_size)
        x, y = self.x, self.y
        # No tf.data autotuning: its optimiser thread can miss the cancel when fit() drops the
        # iterator and hold the process until its next wake-up, up to 60 s later (TF 2.18
        # notifies before marking the iterator cancelled). That cost 16-40 s at the end of 8
        # of 24 demo trials; a gather per batch needs no tuning, a two-batch prefetch hides it.
        options = tf.data.Options()
        options.autotune.enabled = False
        return (
            tf.data.Dataset.from_tensor_slices(batches)
            .map(lambda idx: (_normalise(tf.gather(x, idx)), tf.gather(y, idx)))
            .prefetch(2)
            .with_options(options)
        )


def evaluate_global(model: Any, x: np.ndarray, y: np.ndarray, name: str) -> dict[str, float]:
    """Loss and accuracy over the union of all ranks' shards (weighted by shard size)."""
    import tensorflow as tf

    local = np.zeros(3)
    if len(y):
        ds = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .batch(512)
            .map(lambda a, b: (_normalise(a), b))
        )
        result = model.evaluate(ds, verbose=0, return_dict=True)
        local = np.array([result["loss"] * len(y), result["accuracy"] * len(y), len(y)])
    loss_sum, correct, count = parallel.allreduce_sum(local, name)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def _epoch_metrics(
    logs: Mapping[str, float],
    seconds: float,
    batches: ShardBatches,
    size: int,
    model: Any,
) -> dict[str, float]:
    """This epoch's training metrics averaged over ranks, plus global throughput."""
    from tensorflow import keras

    local = {
        "loss": float(logs["loss"]),
        "accuracy": float(logs["accuracy"]),
        "epoch_seconds": seconds,
    }
    metrics = parallel.allreduce_mean(local, "train.metrics")
    metrics["samples_per_second"] = (
        batches.steps * batches.batch_size * size / metrics["epoch_seconds"]
    )
    metrics["learning_rate"] = float(keras.backend.get_value(model.optimizer.learning_rate))
    return metrics


def weights_digest(model: Any) -> str:
    """sha256 of all weights: equal on every rank iff data-parallel averaging really happened."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import horovod
    import tensorflow as tf
    import tf_keras
    from mpi4py import MPI

    return {
        "hpcdl": __version__,
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": tf_keras.__version__,
        "horovod": horovod.__version__,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
    }


def _load_checkpoint(out: Path, model: Any) -> tuple[int, dict[str, list[float]], float]:
    """Restore the newest complete epoch checkpoint; (epochs done, history, wall seconds so far)."""
    import tensorflow as tf

    ckpt_dir = checkpoint_dir(out)
    done = sorted(ckpt_dir.glob("epoch-*")) if ckpt_dir.is_dir() else []
    if not done:
        return 0, {}, 0.0
    latest = done[-1]
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
        str(latest / "state")
    ).expect_partial()
    record = store.read_run(latest / "history.h5")
    return record.n_epochs, record.epochs, float(record.attrs.get("wall_seconds", 0.0))


def _save_checkpoint(out: Path, model: Any, epoch: int, record: store.RunRecord) -> None:
    """Rank 0: write epoch `epoch`'s state to a temporary dir, rename it, drop older epochs."""
    import tensorflow as tf

    ckpt_dir = checkpoint_dir(out)
    final = ckpt_dir / f"epoch-{epoch:05d}"
    tmp = ckpt_dir / f".epoch-{epoch:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp / "state"))
    store.write_run(tmp / "history.h5", record)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for older in ckpt_dir.glob("epoch-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)


def _save_model(model: Any, params: Mapping[str, Any], info: data.DatasetInfo, path: Path) -> None:
    """Save the trained weights in a plain (non-Horovod) copy of the model, atomically."""
    clean = models.build_model(params, info.sample_shape, info.n_classes)
    clean.set_weights(model.get_weights())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")  # Keras wants the suffix
    clean.save(tmp)
    os.replace(tmp, path)
    log.info("saved model %s", path)


def _resume_problem(out: Path) -> str | None:
    """Why `out` cannot be (re)started, if it cannot: never overwrite a finished run."""
    if not out.exists():
        return None
    try:
        reason = store.read_run(out).attrs.get("stop_reason")
    except (OSError, ValueError) as exc:
        return f"{out}: exists and is not an hpcdl run file ({exc}); choose another --out"
    if reason not in (RUNNING, INTERRUPTED):
        return (
            f"{out}: this run already finished ({reason}); delete it or choose another "
            "--out to train again"
        )
    return None


def train(
    config: Config,
    out: Path,
    on_epoch: EpochHook | None = None,
    run_attrs: Mapping[str, Any] | None = None,
    fit_on_val: bool = False,
    save_model: Path | None = None,
) -> RunResult:
    """Train `config`'s model on this job's ranks; rank 0 writes the run file `out`.

    Resumes from `out`'s checkpoint if one exists. Returns on every rank with the same result.
    fit_on_val: train on train+val (the final model; no validation, no early stopping).
    save_model: rank 0 also saves the trained Keras model there (.keras, no optimizer).
    """
    wall_start = time.perf_counter()
    params = config.params
    ranks = parallel.init(params["intra_op_threads"])
    logs.configure(ranks.rank, ranks.size, ranks.host)
    from tensorflow import keras

    gpu = parallel.pin_gpu(ranks.local_rank)
    info = data.dataset_info(config.dataset_file)
    models.check_architecture(params, info.sample_shape)
    batch_size = params["batch_size"]
    per_rank = info.sizes["train"] // ranks.size
    if per_rank < batch_size:
        raise UserError(
            f"{config.dataset_file}: {info.sizes['train']} training samples over {ranks.size} "
            f"ranks is {per_rank} per rank, fewer than one batch (train.batch_size "
            f"{batch_size}); use fewer ranks or a smaller batch"
        )
    problem = _resume_problem(out) if ranks.is_root else None
    problem = parallel.broadcast_object(problem, "train.resume_problem")
    if problem:
        raise UserError(problem)

    keras.utils.set_random_seed(params["seed"])  # same initial weights on every rank
    train_x, train_y = data.read_shard(config.dataset_file, "train", ranks.rank, ranks.size)
    val_x, val_y = data.read_shard(
        config.dataset_file, "val", ranks.rank, ranks.size, equal=fit_on_val
    )
    if fit_on_val:
        train_x, train_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    train_batches = ShardBatches(train_x, train_y, batch_size, params["seed"], ranks.rank)
    del train_x, train_y
    model = models.build_model(params, info.sample_shape, info.n_classes)
    learning_rate = parallel.scaled_learning_rate(
        params["learning_rate"], ranks.size, params["lr_scaling"]
    )
    model.compile(
        optimizer=parallel.distributed_optimizer(make_optimizer(params, learning_rate)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start_epoch, history, wall_before = _load_checkpoint(out, model)
    start_epoch = parallel.broadcast_object(start_epoch, "train.start_epoch")
    if start_epoch:
        log.info("resuming %s after epoch %d", out, start_epoch)
    hosts = parallel.allgather_object(ranks.host, "train.hosts")
    shard = data.shard_bounds(info.sizes["train"], ranks.rank, ranks.size)
    shards = parallel.allgather_object(list(shard), "train.shards")
    attrs: dict[str, Any] = {
        **(run_attrs or {}),
        "params": params,
        "seed": params["seed"],
        "ranks": ranks.size,
        "hosts": hosts,
        "versions": versions(),
        "n_params": int(model.count_params()),
        "dataset": str(config.dataset_file),
        "config": config.as_dict(),
        "global_batch_size": batch_size * ranks.size,
        "steps_per_epoch": train_batches.steps,
        "device": gpu or "cpu",
        "slurm_job_id": ranks.job_id,
        "train_shards": shards,
    }
    if ranks.is_root:
        log.info(
            "%s: %s, %d params, %d ranks x %d = global batch %d, %d steps/epoch, lr %.3g",
            out,
            params["family"],
            attrs["n_params"],
            ranks.size,
            batch_size,
            batch_size * ranks.size,
            train_batches.steps,
            learning_rate,
        )

    stop = StopRequest()
    stop_callback = _make_stop_callback(stop)
    broadcast, warmup = parallel.sync_callbacks(
        learning_rate, params["warmup_epochs"], train_batches.steps, ranks.size)
    show_progress = ranks.is_root and sys.stdout.isatty()
    reason = COMPLETED
    # early-stopping state continues across a resume: it is derived from the history
    val_losses = history.get("val_loss", [])
    best_val_loss = min(val_losses, default=math.inf)
    epochs_since_best = len(val_losses) - 1 - val_losses.index(best_val_loss) if val_losses else 0

    def interrupted() -> str:
        """Rank 0 records the interruption at once: fit() can take seconds to return after a
        stop at 2 ranks, and mpirun kills its ranks about a second after its own SIGTERM."""
        if ranks.is_root:
            elapsed = wall_before + time.perf_counter() - wall_start
            store.write_run(out, store.RunRecord(
                {**attrs, "stop_reason": INTERRUPTED, "wall_seconds": elapsed}, history))
        return INTERRUPTED

    def end_of_epoch(epoch: int, logs: Mapping[str, float], seconds: float) -> str | None:
        """Validate, record, checkpoint; the stop reason if the run ends after this epoch."""
        nonlocal history, best_val_loss, epochs_since_best
        if stop_callback.stopped:
            log.warning(
                "%s received: stopping after epoch %d's unfinished batch; the "
                "checkpoint of epoch %d stays for resumption",
                stop.signal_name or "stop from another rank", epoch + 1, epoch)
            return interrupted()
        metrics = _epoch_metrics(logs, seconds, train_batches, ranks.size, model)
        if not fit_on_val:
            val = evaluate_global(model, val_x, val_y, f"val.epoch{epoch}")
            metrics.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        # wall time since the run began (earlier sessions included), validation included:
        # its differences are the real period of an epoch, every per-epoch cost counted
        metrics["elapsed_seconds"] = wall_before + time.perf_counter() - wall_start
        history = store.merge_epochs(history, metrics)
        if not all(math.isfinite(v) for k, v in metrics.items() if k.endswith("loss")):
            log.error("epoch %d: non-finite loss %s: stopping", epoch + 1, metrics)
            return FAILED_NON_FINITE
        if ranks.is_root:
            shown = [k for k in EPOCH_METRICS if k in metrics]
            log.info("epoch %d/%d: %s", epoch + 1, params["epochs"],
                     " ".join(f"{k} {metrics[k]:.4g}" for k in shown))
            elapsed = wall_before + time.perf_counter() - wall_start
            record = store.RunRecord(
                {**attrs, "stop_reason": RUNNING, "wall_seconds": elapsed}, history
            )
            _save_checkpoint(out, model, epoch + 1, record)
            store.write_run(out, record)
        if parallel.any_rank(stop.requested):  # signalled late in the epoch: it is kept
            log.warning("%s received: stopping after epoch %d, checkpointed",
                        stop.signal_name or "stop from another rank", epoch + 1)
            return interrupted()
        if on_epoch is not None and on_epoch(epoch, metrics):
            return PRUNED
        if params["patience"] and not fit_on_val:
            if metrics["val_loss"] < best_val_loss:
                best_val_loss, epochs_since_best = metrics["val_loss"], 0
            else:
                epochs_since_best += 1
                if epochs_since_best >= params["patience"]:
                    return EARLY_STOPPED
        return None

    epoch_callback = _make_epoch_callback(end_of_epoch)
    progress = ([_make_progress_callback(f"rank {ranks.rank}/{ranks.size}", params["epochs"],
                                         train_batches.steps)] if show_progress else [])
    if start_epoch < params["epochs"]:
        with stop.installed():
            # One fit() over all epochs: a fit() per epoch cost ~0.85 s of set-up per epoch at
            # 2 ranks (benchmarks/RESULTS.md, benchmark 1); the per-epoch work is a callback.
            model.fit(
                train_batches.epochs(start_epoch, params["epochs"]),
                epochs=params["epochs"],
                initial_epoch=start_epoch,
                steps_per_epoch=train_batches.steps,
                verbose=0,
                callbacks=[stop_callback, *broadcast, *warmup, *progress, epoch_callback],
            )
        reason = epoch_callback.reason or COMPLETED

    test: dict[str, float] = {}
    if reason in (COMPLETED, EARLY_STOPPED):
        test_x, test_y = data.read_shard(
            config.dataset_file, "test", ranks.rank, ranks.size, equal=False
        )
        test = evaluate_global(model, test_x, test_y, "test")
    wall_seconds = wall_before + time.perf_counter() - wall_start
    digests = parallel.allgather_object(weights_digest(model), "train.weights_digest")
    # peak resident memory of each rank (Linux reports KiB): what to ask Slurm for (mem_mb)
    peak_rss = parallel.allgather_object(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "train.peak_rss")
    if save_model is not None and ranks.is_root and reason in (COMPLETED, EARLY_STOPPED):
        _save_model(model, params, info, save_model)
    if ranks.is_root:
        if len(set(digests)) > 1:
            log.error("ranks ended with different weights: gradients were not averaged")
        store.write_run(
            out,
            store.RunRecord(
                {
                    **attrs,
                    "stop_reason": reason,
                    "wall_seconds": wall_seconds,
                    "weights_sha256": digests,
                    "peak_rss_mb": peak_rss,
                },
                history,
                test,
            ),
        )
        if reason != INTERRUPTED:
            shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    # every rank says where it stopped: proof that no rank ran on alone
    log.info(
        "%s: %s after %d epochs%s",
        out,
        reason,
        len(history.get("loss", [])),
        f", test accuracy {test['accuracy']:.4f}" if test else "",
    )
    return RunResult(reason, history, test, attrs["n_params"], wall_seconds, out)
