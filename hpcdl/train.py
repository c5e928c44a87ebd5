"""One data-parallel training run: Horovod's Keras recipe plus what a sweep needs.

`train()` reads like Horovod's Keras example: build the run (`build_run`), fit, finish. Every
rank reads its own shard of the dataset file, trains the same model (gradients averaged by
Horovod), and evaluates its share of val/test; metrics are averaged over ranks (weighted by
shard size). After each epoch `RunProgress` validates, records and checkpoints (rank 0), and
decides whether the run stops there. Each epoch's batch order derives from (seed, rank, epoch),
so a resumed run sees the same batches as an uninterrupted one. The Keras callbacks are in
callbacks.py, the run file and its checkpoints in store.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl import callbacks, data, logs, memory, models, parallel, store, stream, xla
from hpcdl.config import EPOCH_METRICS, Config
from hpcdl.errors import UserError

log = logging.getLogger("hpcdl.train")


class StopReason(StrEnum):
    """Why a run ended (or `running`): the run file's `stop_reason` attribute, as text."""

    COMPLETED = "completed"
    EARLY_STOPPED = "early-stopped"
    PRUNED = "pruned"
    INTERRUPTED = "interrupted"
    FAILED_NON_FINITE = "failed: non-finite loss"
    RUNNING = "running"

    @property
    def failed(self) -> bool:
        return self is StopReason.FAILED_NON_FINITE

    @property
    def finished_training(self) -> bool:
        """The model trained to its end: evaluate on test, save it."""
        return self in (StopReason.COMPLETED, StopReason.EARLY_STOPPED)


# A callback run on every rank after each epoch with the rank-averaged metrics; True = prune.
# It must return the same answer on every rank (worker.py broadcasts rank 0's decision).
EpochHook = Callable[[int, Mapping[str, float]], bool]


@dataclass
class RunResult:
    """How a run ended and what it measured."""

    stop_reason: StopReason
    epochs: dict[str, list[float]]
    test: dict[str, float]
    n_params: int
    wall_seconds: float
    out: Path

    @property
    def n_epochs(self) -> int:
        return len(self.epochs.get("loss", []))


@dataclass
class Clock:
    """Wall seconds of a run, the sessions before a resumption included."""

    before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started


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
        return (
            tf.data.Dataset.from_tensor_slices(batches)
            .map(lambda idx: (stream.normalise(tf.gather(x, idx)), tf.gather(y, idx)))
            .prefetch(2)
            .with_options(stream.no_autotune())
        )


@dataclass
class ArraySplit:
    """Rows of a split held in memory, for evaluation (stream.StreamedSplit streams them)."""

    x: np.ndarray
    y: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.y)

    def dataset(self, batch_size: int) -> Any:
        import tensorflow as tf

        return (tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(batch_size)
                .map(lambda a, b: (stream.normalise(a), b)))


EvalRows = ArraySplit | stream.StreamedSplit
TrainBatches = ShardBatches | stream.StreamBatches


def evaluate_global(model: Any, split: EvalRows, name: str) -> dict[str, float]:
    """Loss and accuracy over the union of all ranks' shards (weighted by shard size)."""
    local = np.zeros(3)
    if split.rows:
        result = model.evaluate(split.dataset(512), verbose=0, return_dict=True)
        local = np.array([result["loss"] * split.rows, result["accuracy"] * split.rows,
                          split.rows])
    loss_sum, correct, count = parallel.allreduce_sum(local, name)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def _epoch_metrics(
    logs: Mapping[str, float],
    seconds: float,
    batches: TrainBatches,
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


def _save_model(model: Any, params: Mapping[str, Any], info: data.DatasetInfo, path: Path) -> None:
    """Save the trained weights in a plain (non-Horovod) copy of the model, atomically."""
    clean = models.build_model(params, info.sample_shape, info.n_classes)
    clean.set_weights(model.get_weights())
    with store.atomic_path(path, suffix=".keras") as tmp:  # Keras picks the format by suffix
        clean.save(tmp)
    log.info("saved model %s", path)


def _resume_problem(out: Path) -> str | None:
    """Why `out` cannot be (re)started, if it cannot: never overwrite a finished run."""
    if not out.exists():
        return None
    try:
        reason = store.read_run(out).attrs.get("stop_reason")
    except (OSError, ValueError) as exc:
        return f"{out}: exists and is not an hpcdl run file ({exc}); choose another --out"
    if reason not in (StopReason.RUNNING, StopReason.INTERRUPTED):
        return (
            f"{out}: this run already finished ({reason}); delete it or choose another "
            "--out to train again"
        )
    return None




@dataclass
class Run:
    """A training run as built on every rank before fit(): what its epochs and its end need."""

    config: Config
    out: Path
    ranks: parallel.Ranks
    info: data.DatasetInfo
    model: Any
    batches: TrainBatches
    val: EvalRows
    learning_rate: float
    fit_on_val: bool
    clock: Clock
    start_epoch: int  # epochs finished before this session (restored from the checkpoint)
    history: dict[str, list[float]]  # their metrics
    input: memory.InputChoice  # how this rank reads its rows
    attrs: dict[str, Any] = field(default_factory=dict)  # the run file's attributes

    @property
    def params(self) -> dict[str, Any]:
        return self.config.params


def check_batch_fits(config: Config, info: data.DatasetInfo, ranks: int) -> None:
    """A rank's shard of train must hold one batch, else no step is ever taken."""
    batch_size = config.params["batch_size"]
    per_rank = info.sizes["train"] // ranks
    if per_rank < batch_size:
        raise UserError(
            f"{config.dataset_file}: {info.sizes['train']} training samples over {ranks} "
            f"ranks is {per_rank} per rank, fewer than one batch (train.batch_size "
            f"{batch_size}); use fewer ranks or a smaller batch"
        )


def check_metrics_recorded(config: Config, info: data.DatasetInfo) -> None:
    """The metrics a sweep optimises (or early-stops on) are recorded: val_* ones need rows in
    the val split, or every epoch would report NaN."""
    search = config.section("search")
    wanted = {f"search.metric {search['metric']}": search["metric"]}
    if search["second_objective"]:
        metric = search["second_objective"]["metric"]
        wanted[f"search.second_objective.metric {metric}"] = metric
    if config.params["patience"]:
        wanted[f"train.patience {config.params['patience']} (early stopping on val_loss)"] = (
            "val_loss")
    needs_val = [key for key, metric in wanted.items() if metric.startswith("val_")]
    if needs_val and not info.sizes["val"]:
        raise UserError(f"{config.dataset_file}: the val split is empty, but "
                        f"{', '.join(needs_val)} needs it; prepare the dataset with a "
                        "val_fraction > 0 or optimise a train metric")


def _check_can_start(config: Config, out: Path, ranks: parallel.Ranks,
                     info: data.DatasetInfo) -> None:
    """Refuse, alike on every rank, a run that cannot start: too few samples per rank for one
    batch, or a finished run file at `out`."""
    check_batch_fits(config, info, ranks.size)
    problem = _resume_problem(out) if ranks.is_root else None
    problem = parallel.broadcast_object(problem, "train.resume_problem")
    if problem:
        raise UserError(problem)


def _compiled_model(params: Mapping[str, Any], info: data.DatasetInfo,
                    size: int) -> tuple[Any, float]:
    """The model with its gradients averaged over `size` ranks, at the learning rate scaled
    for them."""
    model = models.build_model(params, info.sample_shape, info.n_classes)
    learning_rate = parallel.scaled_learning_rate(
        params["learning_rate"], size, params["lr_scaling"]
    )
    optimizer = make_optimizer(params, learning_rate)
    jit_compile = params["jit_compile"]
    if jit_compile and size > 1:
        # Keras would compile the whole step, Horovod's allreduce included, which has no XLA
        # CPU kernel: XLA computes the gradients, they are averaged outside it (xla.py)
        model, jit_compile = xla.allreduce_outside_xla(model), False
    else:
        optimizer = parallel.distributed_optimizer(optimizer)
    # Under train.mixed_precision float16 Keras wraps the optimizer in a LossScaleOptimizer
    # (dynamic loss scaling); the gradients are averaged float32 like the variables, so every
    # rank takes the same loss-scale step (tests: test_models, test_train)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model, learning_rate


def _run_attrs(run: Run, extra: Mapping[str, Any], device: str | None) -> dict[str, Any]:
    """The run file's attributes: what ran where, with which versions (collective)."""
    ranks, params, batch_size = run.ranks, run.params, run.params["batch_size"]
    hosts = parallel.allgather_object(ranks.host, "train.hosts")
    shard = data.shard_bounds(run.info.sizes["train"], ranks.rank, ranks.size)
    shards = parallel.allgather_object(list(shard), "train.shards")
    return {
        **extra,
        "params": params,
        "seed": params["seed"],
        "ranks": ranks.size,
        "hosts": hosts,
        "versions": parallel.versions(),
        "n_params": int(run.model.count_params()),
        "dataset": str(run.config.dataset_file),
        "config": run.config.as_dict(),
        "global_batch_size": batch_size * ranks.size,
        "steps_per_epoch": run.batches.steps,
        "device": device or "cpu",
        "slurm_job_id": ranks.job_id,
        "train_shards": shards,
        "input": parallel.allgather_object(run.input.as_dict(), "train.input"),
    }


def choose_input(config: Config, info: data.DatasetInfo, ranks: parallel.Ranks,
                 fit_on_val: bool) -> memory.InputChoice:
    """memory or stream for this rank (train.input; auto weighs the shard, val included,
    against the memory the rank may use), logged with the rank."""
    rows = sum(stop - start for start, stop in (
        data.shard_bounds(info.sizes["train"], ranks.rank, ranks.size),
        data.shard_bounds(info.sizes["val"], ranks.rank, ranks.size, equal=fit_on_val)))
    row_bytes = int(np.prod(info.sample_shape)) * np.dtype(info.dtype).itemsize + 8
    budget = memory.budget(ranks.local_size)
    choice = memory.choose_input(config.params["input"], int(rows) * row_bytes,
                                 budget.per_rank, ranks.rank)
    log.info("input: %s (train.input %s; shard %.0f MB, %.0f MB available to this rank: "
             "MemAvailable %.0f MB, cgroup headroom %s, over %d local ranks)",
             choice.mode, choice.requested, choice.shard_mb, choice.per_rank_mb,
             budget.mem_available / 2**20,
             "none" if budget.cgroup_headroom is None
             else f"{budget.cgroup_headroom / 2**20:.0f} MB", budget.local_ranks)
    return choice


def eval_rows(info: data.DatasetInfo, split: str, ranks: parallel.Ranks, mode: str,
              equal: bool) -> EvalRows:
    """This rank's rows of `split` for evaluation, in memory or streamed."""
    path = info.path
    bounds = data.shard_bounds(info.sizes[split], ranks.rank, ranks.size, equal)
    if mode == "stream":
        return stream.StreamedSplit(stream.ShardLayout.of(path, [(split, *bounds)]))
    return ArraySplit(*data.read_shard(path, split, ranks.rank, ranks.size, equal))


def read_inputs(params: Mapping[str, Any], info: data.DatasetInfo, ranks: parallel.Ranks,
                fit_on_val: bool, choice: memory.InputChoice) -> tuple[TrainBatches, EvalRows]:
    """This rank's training batches (train, or train+val for the final model) and val rows."""
    path = info.path
    val = eval_rows(info, "val", ranks, choice.mode, equal=fit_on_val)
    if choice.mode == "stream":
        segments = [("train", *data.shard_bounds(info.sizes["train"], ranks.rank, ranks.size))]
        if fit_on_val:
            segments.append(("val", *data.shard_bounds(info.sizes["val"], ranks.rank,
                                                       ranks.size, equal=True)))
        layout = stream.ShardLayout.of(path, segments)
        # never more than a quarter of what the rank may use: TensorFlow needs the rest
        buffer_mb = min(params["stream_buffer_mb"], choice.per_rank_mb / 4)
        return stream.StreamBatches(layout, params["batch_size"], params["seed"], ranks.rank,
                                    buffer_mb), val
    train_x, train_y = data.read_shard(path, "train", ranks.rank, ranks.size)
    if fit_on_val and isinstance(val, ArraySplit):
        train_x = np.concatenate([train_x, val.x])
        train_y = np.concatenate([train_y, val.y])
    return ShardBatches(train_x, train_y, params["batch_size"], params["seed"], ranks.rank), val


def build_run(config: Config, out: Path, ranks: parallel.Ranks, clock: Clock,
              run_attrs: Mapping[str, Any], fit_on_val: bool) -> Run:
    """Everything before fit(), on every rank: inputs checked, this rank's shards read, the
    model compiled and restored from `out`'s checkpoint if there is one."""
    from tensorflow import keras

    params = config.params
    placements, gpu = parallel.place_ranks(ranks)
    info = data.dataset_info(config.dataset_file)
    models.check_architecture(params, info.sample_shape)
    _check_can_start(config, out, ranks, info)

    keras.utils.set_random_seed(params["seed"])  # same initial weights on every rank
    choice = choose_input(config, info, ranks, fit_on_val)
    batches, val = read_inputs(params, info, ranks, fit_on_val, choice)
    model, learning_rate = _compiled_model(params, info, ranks.size)
    start_epoch, history, clock.before = store.load_checkpoint(out, model)
    start_epoch = parallel.broadcast_object(start_epoch, "train.start_epoch")
    if start_epoch:
        log.info("resuming %s after epoch %d", out, start_epoch)
    run = Run(config, out, ranks, info, model, batches, val, learning_rate,
              fit_on_val, clock, start_epoch, history, choice)
    run.attrs = {**_run_attrs(run, run_attrs, gpu),
                 "placement": [placement.as_dict() for placement in placements]}
    if ranks.is_root:
        log.info(
            "%s: %s, %d params, %d ranks x %d = global batch %d, %d steps/epoch, lr %.3g",
            out,
            params["family"],
            run.attrs["n_params"],
            ranks.size,
            params["batch_size"],
            run.attrs["global_batch_size"],
            batches.steps,
            learning_rate,
        )
    return run


class RunProgress:
    """Per-epoch bookkeeping of a run, on every rank: the history, early stopping, the pruning
    hook, rank 0's checkpoint and run file, and the agreement to stop on a signal."""

    def __init__(self, run: Run, on_epoch: EpochHook | None) -> None:
        self.run = run
        self.on_epoch = on_epoch
        self.history = run.history
        self.stop = callbacks.StopRequest()
        self.agreement = callbacks.stop_agreement(self.stop)
        # early-stopping state continues across a resume: it is derived from the history
        val_losses = self.history.get("val_loss", [])
        self.best_val_loss = min(val_losses, default=math.inf)
        self.epochs_since_best = (
            len(val_losses) - 1 - val_losses.index(self.best_val_loss) if val_losses else 0
        )

    def record(self, reason: StopReason, wall_seconds: float | None = None,
               test: Mapping[str, float] | None = None, **extra: Any) -> store.RunRecord:
        """The run file as of now."""
        elapsed = self.run.clock.elapsed() if wall_seconds is None else wall_seconds
        attrs = {**self.run.attrs, "stop_reason": reason.value, "wall_seconds": elapsed, **extra}
        return store.RunRecord(attrs, self.history, dict(test or {}))

    def end_of_epoch(self, epoch: int, logs: Mapping[str, float],
                     seconds: float) -> StopReason | None:
        """Validate, record, checkpoint; the stop reason if the run ends after this epoch."""
        if self.agreement.stopped:
            log.warning(
                "%s received: stopping after epoch %d's unfinished batch; the "
                "checkpoint of epoch %d stays for resumption",
                self._signal_name(), epoch + 1, epoch)
            return self.interrupted()
        metrics = self._measure(epoch, logs, seconds)
        self.history = store.merge_epochs(self.history, metrics)
        if not all(math.isfinite(v) for k, v in metrics.items() if k.endswith("loss")):
            log.error("epoch %d: non-finite loss %s: stopping", epoch + 1, metrics)
            return StopReason.FAILED_NON_FINITE
        if self.run.ranks.is_root:
            self._log_and_checkpoint(epoch, metrics)
        if parallel.any_rank(self.stop.requested):  # signalled late in the epoch: it is kept
            log.warning("%s received: stopping after epoch %d, checkpointed",
                        self._signal_name(), epoch + 1)
            return self.interrupted()
        if self.on_epoch is not None and self.on_epoch(epoch, metrics):
            return StopReason.PRUNED
        if self._patience_spent(metrics):
            return StopReason.EARLY_STOPPED
        return None

    def interrupted(self) -> StopReason:
        """Rank 0 records the interruption at once: fit() can take seconds to return after a
        stop at 2 ranks, and mpirun kills its ranks about a second after its own SIGTERM."""
        if self.run.ranks.is_root:
            store.write_run(self.run.out, self.record(StopReason.INTERRUPTED))
        return StopReason.INTERRUPTED

    def _signal_name(self) -> str:
        return self.stop.signal_name or "stop from another rank"

    def _measure(self, epoch: int, logs: Mapping[str, float], seconds: float) -> dict[str, float]:
        """The epoch's metrics, averaged over ranks, validation included."""
        run = self.run
        metrics = _epoch_metrics(logs, seconds, run.batches, run.ranks.size, run.model)
        if not run.fit_on_val:
            val = evaluate_global(run.model, run.val, f"val.epoch{epoch}")
            metrics.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        # wall time since the run began (earlier sessions included), validation included:
        # its differences are the real period of an epoch, every per-epoch cost counted
        metrics["elapsed_seconds"] = run.clock.elapsed()
        return metrics

    def _log_and_checkpoint(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Rank 0: the epoch's log line, its checkpoint and the run file as of this epoch."""
        shown = [k for k in EPOCH_METRICS if k in metrics]
        log.info("epoch %d/%d: %s", epoch + 1, self.run.params["epochs"],
                 " ".join(f"{k} {metrics[k]:.4g}" for k in shown))
        record = self.record(StopReason.RUNNING)
        store.save_checkpoint(self.run.out, self.run.model, epoch + 1, record)
        store.write_run(self.run.out, record)

    def _patience_spent(self, metrics: Mapping[str, float]) -> bool:
        """Early stopping: no better val_loss for `patience` epochs (never when fitting on val)."""
        patience = self.run.params["patience"]
        if not patience or self.run.fit_on_val:
            return False
        if metrics["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.epochs_since_best = metrics["val_loss"], 0
            return False
        self.epochs_since_best += 1
        return self.epochs_since_best >= patience


def fit(run: Run, progress: RunProgress) -> StopReason:
    """Train the remaining epochs on every rank; why the fit ended."""
    params, ranks, batches = run.params, run.ranks, run.batches
    broadcast, warmup = parallel.sync_callbacks(
        run.learning_rate, params["warmup_epochs"], batches.steps, ranks.size)
    show_progress = ranks.is_root and sys.stdout.isatty()
    bar = ([callbacks.progress_bar(f"rank {ranks.rank}/{ranks.size}", params["epochs"],
                                   batches.steps)] if show_progress else [])
    epoch_end = callbacks.epoch_end(progress.end_of_epoch)
    with progress.stop.installed():
        # One fit() over all epochs: a fit() per epoch cost ~0.85 s of set-up per epoch at
        # 2 ranks (benchmarks/RESULTS.md, benchmark 1); the per-epoch work is a callback.
        run.model.fit(
            batches.epochs(run.start_epoch, params["epochs"]),
            epochs=params["epochs"],
            initial_epoch=run.start_epoch,
            steps_per_epoch=batches.steps,
            verbose=0,
            callbacks=[progress.agreement, *broadcast, *warmup, *bar, epoch_end],
        )
    return epoch_end.reason or StopReason.COMPLETED


def finish(run: Run, progress: RunProgress, reason: StopReason,
           save_model: Path | None) -> RunResult:
    """After fit, on every rank: test, the proof of averaging, rank 0's final run file."""
    ranks = run.ranks
    test: dict[str, float] = {}
    if reason.finished_training:
        test_rows = eval_rows(run.info, "test", ranks, run.input.mode, equal=False)
        test = evaluate_global(run.model, test_rows, "test")
    wall_seconds = run.clock.elapsed()
    digests = parallel.allgather_object(weights_digest(run.model), "train.weights_digest")
    # peak resident memory of each rank (Linux reports KiB): what to ask Slurm for (mem_mb)
    peak_rss = parallel.allgather_object(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "train.peak_rss")
    if save_model is not None and ranks.is_root and reason.finished_training:
        _save_model(run.model, run.params, run.info, save_model)
    if ranks.is_root:
        if len(set(digests)) > 1:
            log.error("ranks ended with different weights: gradients were not averaged")
        store.write_run(run.out, progress.record(
            reason, wall_seconds, test, weights_sha256=digests, peak_rss_mb=peak_rss))
        if reason != StopReason.INTERRUPTED:
            store.drop_checkpoint(run.out)
    # every rank says where it stopped: proof that no rank ran on alone
    log.info(
        "%s: %s after %d epochs%s",
        run.out,
        reason,
        len(progress.history.get("loss", [])),
        f", test accuracy {test['accuracy']:.4f}" if test else "",
    )
    return RunResult(reason, progress.history, test, run.attrs["n_params"], wall_seconds, run.out)


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
    clock = Clock()
    ranks = parallel.init(config.params["intra_op_threads"])
    logs.configure(ranks.rank, ranks.size, ranks.host)
    run = build_run(config, out, ranks, clock, run_attrs or {}, fit_on_val)
    progress = RunProgress(run, on_epoch)
    reason = StopReason.COMPLETED
    if run.start_epoch < run.params["epochs"]:
        reason = fit(run, progress)
    return finish(run, progress, reason, save_model)
