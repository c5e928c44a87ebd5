"""`hpcdl train`: data parallelism is real (2 Open MPI ranks), resume is exact, failures clean."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import evaluate_model, hpcdl_env, run_hpcdl, run_mpi, write_sweep_config
from hpcdl import callbacks, config, data, store, study
from hpcdl.config import EPOCH_METRICS

pytestmark = [pytest.mark.slow]

SMOKE = "configs/smoke.yaml"


def train_args(results: Path, out: Path, *overrides: str) -> list[str]:
    args = ["train", "--config", SMOKE, "--set", f"results_dir={results}", "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    return args


@pytest.mark.mpi
def test_two_ranks_average_gradients(results: Path) -> None:
    out = results / "two.h5"
    result = run_mpi(2, "hpcdl", *train_args(results, out, "warmup_epochs=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = store.read_run(out)
    assert run.attrs["ranks"] == 2 and run.attrs["stop_reason"] == "completed"
    # identical weights on both ranks although each trained on its own shard
    assert len(run.attrs["weights_sha256"]) == 2 and len(set(run.attrs["weights_sha256"])) == 1
    (a0, a1), (b0, b1) = run.attrs["train_shards"]
    assert a1 <= b0 and a1 - a0 == b1 - b0 > 0
    n_train = data.dataset_info(out.parent / "data" / "digits.h5").sizes["train"]
    assert run.attrs["global_batch_size"] == 32 * 2
    assert run.attrs["steps_per_epoch"] == n_train // (32 * 2)
    assert run.n_epochs == 4 and run.epochs["val_accuracy"][-1] > 0.9
    assert 0.9 < run.test["accuracy"] <= 1.0
    # Horovod's warm-up ramps the learning rate up to the linearly scaled one, then holds it
    base = run.attrs["params"]["learning_rate"]
    lr = run.epochs["learning_rate"]
    assert lr[0] < lr[1] and lr[1:] == pytest.approx([2 * base] * 3)
    # every log line of a rank names the rank; only rank 0 reports epochs
    epoch_lines = [ln for ln in result.stderr.splitlines() if "hpcdl.train: epoch" in ln]
    assert len(epoch_lines) == 4 and all("[rank 0/2@" in ln for ln in epoch_lines)
    # mpirun gives every rank a pseudo-terminal for stdout: rank 0 alone draws a progress bar,
    # hpcdl's own, redrawn at most once a second (Keras' bar synced the metrics every batch)
    assert "step - loss:" not in result.stdout
    drawn = re.findall(r"\[rank (\d)/2\] epoch (\d)/4", result.stdout)
    assert {rank for rank, _ in drawn} == {"0"} and {e for _, e in drawn} == {"1", "2", "3", "4"}
    for epoch, seconds in enumerate(run.epochs["epoch_seconds"], 1):
        assert drawn.count(("0", str(epoch))) <= 2 + seconds / callbacks.PROGRESS_SECONDS
    header = subprocess.run(["h5dump", "-H", str(out)], capture_output=True, text=True, check=True)
    assert 'DATASET "val_accuracy"' in header.stdout
    # no TensorFlow start-up noise from either rank (hpcdl/quiet.py), no absl INFO per checkpoint
    noise = ("absl::InitializeLog()", "Unable to register cu", "Sharding callback duration")
    assert not [ln for ln in result.stderr.splitlines() if any(n in ln for n in noise)], \
        result.stderr[-3000:]


# Slurm's --gpus-per-task=1 without cgroups, on this machine: each rank is shown its own GPU
ONE_GPU_PER_RANK = ["sh", "-c", 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec "$@"', "sh"]


@pytest.mark.mpi
def test_each_rank_records_its_gpu_placement(results: Path) -> None:
    out = results / "placed.h5"
    result = run_mpi(2, *ONE_GPU_PER_RANK, "hpcdl", *train_args(results, out, "epochs=1"),
                     SLURM_STEP_GPUS="0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    host = store.read_run(out).attrs["hosts"][0]
    # no real GPU here: each rank records the device it would pin, the one it was given
    assert store.read_run(out).attrs["placement"] == [
        {"host": host, "rank": rank, "local_rank": rank, "cuda_visible_devices": str(rank),
         "slurm_gpus": "0,1", "device": 0, "gpu": str(rank)} for rank in (0, 1)]


@pytest.mark.mpi
def test_two_ranks_on_one_gpu_are_refused_before_training(results: Path) -> None:
    out = results / "shared.h5"
    result = run_mpi(2, "-x", "CUDA_VISIBLE_DEVICES=0", "hpcdl",
                     *train_args(results, out, "epochs=1"))
    assert result.returncode != 0
    host = socket.gethostname()
    assert (f"GPU placement: ranks 0 and 1 on {host} both pin GPU 0 (one rank per GPU: ask "
            "Slurm for as many GPUs per node as ranks per node)") in result.stderr
    assert "Traceback" not in result.stderr and "epoch 1/" not in result.stderr
    assert not out.exists()


def test_one_rank(results: Path) -> None:
    out = results / "one.h5"
    result = run_hpcdl(*train_args(results, out))
    assert result.returncode == 0, result.stderr[-3000:]
    run = store.read_run(out)
    assert run.attrs["ranks"] == 1 and run.epochs["val_accuracy"][-1] > 0.9
    assert set(run.epochs) >= set(EPOCH_METRICS)
    assert run.attrs["params"]["width"] == 64 and run.attrs["versions"]["keras"].startswith("2.18")
    assert not (results / "one.h5.ckpt").exists()  # checkpoints dropped once complete
    before = out.read_bytes(), out.stat().st_mtime_ns
    again = run_hpcdl(*train_args(results, out))  # a finished run is never overwritten
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before, "the finished run was rewritten"
    assert again.returncode == 2 and "already finished (completed)" in again.stderr


@pytest.mark.mpi
@pytest.mark.parametrize(("mode", "jit"), [("memory", "false"), ("stream", "false"),
                                         ("memory", "true")])
def test_sigterm_then_resume_equals_uninterrupted(results: Path, mode: str, jit: str) -> None:
    # batch size 1 and 4 epochs: the signal, sent once epoch 1 is checkpointed, lands with
    # epochs (~1 s each on an idle 2-core machine) still to run, however fast the machine
    slow = ("train.batch_size=1", "train.epochs=4", f"train.input={mode}",
            f"train.jit_compile={jit}")
    if mode == "stream":  # through gzip chunks, the filter `hpcdl prepare` writes on request
        data.write_dataset(data.load_source("digits", data.SourceOptions()),
                           results / "data" / "digits.h5", val_fraction=0.1, seed=0, force=True,
                           write=data.WriteOptions("gzip"))
    out = results / "resumed.h5"
    command = ["mpirun", "-np", "2", "hpcdl", *train_args(results, out, *slow)]
    job = subprocess.Popen(
        command, env=hpcdl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    checkpoint = results / "resumed.h5.ckpt" / "epoch-00001"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True,
                           check=True).stdout.split()
    for pid in ranks:  # what Slurm does at the time limit: signal every task
        os.kill(int(pid), signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 75, stderr[-3000:]
    assert "SIGTERM received" in stderr, stderr[-3000:]
    assert "exited on signal" not in stderr  # ranks stopped themselves, nothing was killed
    interrupted = store.read_run(out)
    # the signal may land during an epoch's validation: then that epoch is kept too
    assert interrupted.attrs["stop_reason"] == "interrupted", stderr[-3000:]
    assert 1 <= interrupted.n_epochs < 4

    resumed = run_mpi(2, "hpcdl", *train_args(results, out, *slow))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after epoch {interrupted.n_epochs}" in resumed.stderr
    final = store.read_run(out)
    assert final.attrs["stop_reason"] == "completed" and final.n_epochs == 4
    assert {choice["mode"] for choice in final.attrs["input"]} == {mode}
    with h5py.File(results / "data" / "digits.h5") as dataset:
        assert dataset["train/x"].compression == ("gzip" if mode == "stream" else None)
    # the run's clock carries on across the resume
    elapsed = final.epochs["elapsed_seconds"]
    assert elapsed[: interrupted.n_epochs] == interrupted.epochs["elapsed_seconds"]
    assert all(a < b for a, b in itertools.pairwise(elapsed))

    reference = results / "uninterrupted.h5"
    assert run_mpi(2, "hpcdl", *train_args(results, reference, *slow)).returncode == 0
    expected = store.read_run(reference)
    assert final.attrs["weights_sha256"] == expected.attrs["weights_sha256"]
    assert final.epochs["val_loss"] == expected.epochs["val_loss"]
    assert final.test == expected.test


@pytest.mark.mpi
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_mixed_precision_keeps_ranks_identical(results: Path, precision: str) -> None:
    out = results / f"{precision}.h5"
    result = run_mpi(2, "hpcdl", *train_args(results, out, f"train.mixed_precision={precision}",
                                             "train.epochs=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = store.read_run(out)
    assert len(set(run.attrs["weights_sha256"])) == 1 and run.epochs["val_accuracy"][-1] > 0.8


# TensorFlow logs this once per process that ran an XLA-compiled function (at log level 0)
XLA_COMPILED = "Compiled cluster using XLA!"


def test_jit_compile_trains_one_rank(results: Path) -> None:
    out = results / "xla.h5"
    result = run_hpcdl(*train_args(results, out, "train.jit_compile=true", "train.epochs=1"),
                       TF_CPP_MIN_LOG_LEVEL="0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert store.read_run(out).attrs["params"]["jit_compile"] is True
    assert result.stderr.count(XLA_COMPILED) == 1, result.stderr[-3000:]


@pytest.mark.mpi
@pytest.mark.parametrize("precision", ["null", "float16"])
def test_jit_compile_at_two_ranks_matches_the_uncompiled_run(results: Path,
                                                            precision: str) -> None:
    # XLA computes the gradients, Horovod averages them outside XLA (hpcdl/xla.py)
    same = ("optimizer=sgd", "learning_rate=0.05", f"train.mixed_precision={precision}")
    runs = {}
    for jit in ("true", "false"):
        out = results / f"jit-{jit}.h5"
        result = run_mpi(2, "hpcdl", *train_args(results, out, *same, f"train.jit_compile={jit}"),
                         TF_CPP_MIN_LOG_LEVEL="0")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.count(XLA_COMPILED) == (2 if jit == "true" else 0)  # per rank
        runs[jit] = store.read_run(out)
    compiled, plain = runs["true"], runs["false"]
    assert len(set(compiled.attrs["weights_sha256"])) == 1  # gradients really averaged
    assert compiled.epochs["loss"] == pytest.approx(plain.epochs["loss"], abs=1e-3)
    assert compiled.epochs["accuracy"] == pytest.approx(plain.epochs["accuracy"], abs=1e-3)
    assert compiled.epochs["val_accuracy"][-1] > 0.7


def test_non_finite_loss_is_a_clean_failure(results: Path) -> None:
    out = results / "nan.h5"
    result = run_hpcdl(*train_args(results, out, "learning_rate=1.0e9", "optimizer=sgd"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "run failed (failed: non-finite loss)" in result.stderr
    assert store.read_run(out).attrs["stop_reason"] == "failed: non-finite loss"


@pytest.mark.mpi
def test_more_ranks_than_a_batch_of_samples(results: Path) -> None:
    result = run_mpi(2, "hpcdl", *train_args(results, results / "x.h5", "batch_size=700"))
    assert result.returncode != 0
    assert "1293 training samples over 2 ranks is 646 per rank, fewer than one batch" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_dataset_missing_or_foreign(results: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    result = run_hpcdl(*train_args(empty, empty / "x.h5"))
    assert result.returncode == 2
    assert f"{empty}/data/digits.h5: dataset file does not exist" in result.stderr
    with h5py.File(results / "data" / "digits.h5", "r+") as f:
        f.attrs["format"] = "something-else"
    result = run_hpcdl(*train_args(results, results / "x.h5"))
    assert result.returncode == 2 and "not an hpcdl dataset file" in result.stderr


def test_early_stopping_on_val_loss(results: Path) -> None:
    out = results / "early.h5"
    result = run_hpcdl(*train_args(results, out, "patience=2", "epochs=40", "learning_rate=0.02"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = store.read_run(out)
    assert run.attrs["stop_reason"] == "early-stopped" and run.n_epochs < 40
    losses = run.epochs["val_loss"]
    best = losses.index(min(losses))
    assert len(losses) - 1 - best == 2  # stopped after exactly `patience` epochs without gain
    assert run.test  # an early-stopped run is still tested


def test_training_batches_leave_no_autotuner_to_outlive_fit() -> None:
    """tf.data's autotuner thread can sleep through the iterator's cancel (up to 60 s per
    trial in the demo sweep), so the training batches are built without it."""
    import numpy as np

    from hpcdl.train import ShardBatches

    batches = ShardBatches(np.zeros((10, 4), np.uint8), np.arange(10), 3, seed=0, rank=0)
    dataset = batches.epochs(0, 2)
    assert dataset.options().autotune.enabled is False
    labels = [y.numpy() for _, y in dataset]
    assert len(labels) == 2 * batches.steps and all(len(set(b)) == 3 for b in labels)


# the best trial of a made-up study: narrow and slow to learn, so that after one epoch the
# per-rank losses on the test shards differ and an unweighted mean would show
FINAL_PARAMS = {"width": 16, "depth": 1, "learning_rate": 3.0e-4, "dropout": 0.0}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory, digits_h5: Path) -> Path:
    """A results dir with digits prepared from an npz: a 7-row test split (shards of 4 and 3
    rows at 2 ranks) and an odd validation split."""
    results = tmp_path_factory.mktemp("uneven")
    with h5py.File(digits_h5) as f:
        arrays = {"x": np.concatenate([f["train/x"][()], f["val/x"][()]]),
                  "y": np.concatenate([f["train/y"][()], f["val/y"][()]]),
                  "x_test": f["test/x"][:7], "y_test": f["test/y"][:7]}
    np.savez(results / "digits.npz", **arrays)
    prepared = run_hpcdl("prepare", f"npz:{results / 'digits.npz'}", "--val-fraction", "0.22",
                         "--out", str(results / "data" / "digits.h5"))
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    sizes = data.dataset_info(results / "data" / "digits.h5").sizes
    assert sizes["test"] == 7 and sizes["val"] % 2 == 1, sizes
    return results


@pytest.fixture(scope="module")
def final_run(uneven: Path) -> Path:
    """`hpcdl final` at 2 ranks on a study whose one complete trial has FINAL_PARAMS."""
    cfg_path = write_sweep_config(uneven, search={"n_trials": 1})
    cfg = config.load(cfg_path)
    s = study.open_study(cfg)
    s.enqueue_trial(FINAL_PARAMS)
    trial = s.ask()
    assert study.suggest(trial, cfg.section("search")["space"]) == FINAL_PARAMS
    s.tell(trial, 0.5)
    result = run_mpi(2, "hpcdl", "final", "--config", str(cfg_path), "--set", "epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return cfg_path


@pytest.mark.mpi
def test_best_model_loads_and_was_trained_on_train_and_val(final_run: Path) -> None:
    cfg = config.load(final_run)
    sizes = data.dataset_info(cfg.dataset_file).sizes
    run = store.read_run(cfg.paths.best_run)
    assert run.attrs["stop_reason"] == "completed" and run.attrs["best_trial"] == 0
    assert run.attrs["params"] | FINAL_PARAMS == run.attrs["params"]
    assert "val_loss" not in run.epochs  # nothing held out to validate on
    # each rank trains on its equal share of train and of val, in batches of 32
    per_rank = sizes["train"] // 2 + sizes["val"] // 2
    assert run.attrs["steps_per_epoch"] == per_rank // 32 != (sizes["train"] // 2) // 32
    reference = evaluate_model(cfg.paths.best_model, cfg.dataset_file, "test")
    assert reference["input_shape"] == [None, 8, 8, 1]
    assert reference["accuracy"] == pytest.approx(run.test["accuracy"], rel=1e-6)


@pytest.mark.mpi
def test_val_and_test_metrics_are_weighted_by_shard_size(final_run: Path, tmp_path: Path
                                                         ) -> None:
    cfg = config.load(final_run)
    # test: the 2-rank run's metrics over shards of 4 and 3 rows equal one process's
    # evaluation of the same saved weights on all 7 rows
    run = store.read_run(cfg.paths.best_run)
    reference = evaluate_model(cfg.paths.best_model, cfg.dataset_file, "test")
    assert run.test["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert run.test["accuracy"] == pytest.approx(reference["accuracy"], rel=1e-6)
    # val: a dataset whose val split holds the test rows; the last epoch's val metrics and the
    # test metrics come from the same final weights, so they must be equal
    (tmp_path / "data").mkdir()
    same = tmp_path / "data" / "digits.h5"
    with h5py.File(cfg.dataset_file) as source, h5py.File(same, "w") as copy:
        copy.attrs.update(source.attrs)
        for split in ("train", "test"):
            source.copy(source[split], copy, name=split)
        source.copy(source["test"], copy, name="val")
    out = tmp_path / "val-is-test.h5"
    result = run_mpi(2, "hpcdl", *train_args(tmp_path, out, "epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    val_is_test = store.read_run(out)
    assert val_is_test.epochs["val_loss"][-1] == pytest.approx(val_is_test.test["loss"],
                                                               rel=1e-9)
    assert val_is_test.epochs["val_accuracy"][-1] == pytest.approx(
        val_is_test.test["accuracy"], abs=1e-9)
