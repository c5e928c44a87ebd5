"""Benchmark 1: `hpcdl train` vs a minimal Keras script (1 rank) and vs Horovod's plain recipe
(2 ranks): same model (MLP 784-512-512-10), batch 128 per rank, Fashion-MNIST, validation every
epoch. Runs alternate A, B, A, B ... in one session. The figure is the median epoch period:
wall time from one epoch's end to the next (training, validation, checkpoints, callbacks and
bookkeeping all included), epoch 1 (graph tracing) left out, and its ratio.
Goal: hpcdl / baseline <= 1.05."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import FASHION_MNIST, REPO, append_results, fashion_mnist, run, summary

# hpcdl tells Open MPI to yield rather than busy-poll on a rank bound to one core (hpcdl/parallel
# .py); the recipe gets the same setting, so the ratio measures hpcdl's own costs, not a tuning.
SAME_MPI = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def hpcdl_epochs(ranks: int, epochs: int, work: Path) -> list[float]:
    out = work / f"hpcdl-{ranks}.h5"
    out.unlink(missing_ok=True)
    sets = ["--set=width=512", "--set=depth=2", "--set=dropout=0", f"--set=epochs={epochs}",
            "--set=batch_size=128", "--set=intra_op_threads=0", f"--set=results_dir={REPO}/results"]
    # One rank runs as plain `hpcdl train`, like the plain-Keras baseline: `mpirun -np 1`
    # would pin it to one core and compare unlike with like.
    launch = ["mpirun", "-np", str(ranks)] if ranks > 1 else []
    run([*launch, "hpcdl", "train", "--config", str(REPO / "configs" / "demo.yaml"), *sets,
         "--out", str(out)], **SAME_MPI)
    sys.path.insert(0, str(REPO))
    from hpcdl import store

    return list(np.diff(store.read_run(out).epochs["elapsed_seconds"]))


def baseline_epochs(ranks: int, epochs: int) -> list[float]:
    command = [sys.executable, str(REPO / "benchmarks" / "baseline.py"),
               "--data", str(FASHION_MNIST), "--epochs", str(epochs)]
    if ranks > 1:
        command = ["mpirun", "-np", str(ranks), *command, "--horovod"]
    line = [ln for ln in run(command, **SAME_MPI).stdout.splitlines() if ln.startswith("{")][-1]
    return list(np.diff(json.loads(line)["epoch_ends"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 2 epochs")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    reps, epochs = (2, 2) if args.quick else (args.reps, args.epochs)
    fashion_mnist()
    table = [["ranks", "baseline", "hpcdl epoch s", "baseline epoch s", "ratio hpcdl/baseline"]]
    with tempfile.TemporaryDirectory() as tmp:
        for ranks, name in ((1, "plain Keras"), (2, "plain Horovod recipe")):
            ours, theirs, ratios = [], [], []
            for _ in range(reps):  # alternate A and B
                a = statistics.median(hpcdl_epochs(ranks, epochs, Path(tmp)))
                b = statistics.median(baseline_epochs(ranks, epochs))
                ours.append(a)
                theirs.append(b)
                ratios.append(a / b)
            table.append([str(ranks), name, summary(ours), summary(theirs), summary(ratios)])
    append_results(
        "1. Training overhead: hpcdl train vs plain Keras / plain Horovod",
        table,
        f"MLP 784-512-512-10, batch 128 per rank, Adam, Fashion-MNIST (54000 train, 6000 val), "
        f"{epochs} epochs per run, {reps} alternated repetitions. Epoch period = wall time "
        "between consecutive epoch ends on rank 0 (hpcdl: differences of the run file's "
        "elapsed_seconds; baseline: a last Keras callback), so epoch 1 (tracing) is left out "
        "and everything an epoch costs is in: training, validation (each rank on its share of "
        "val on both sides), checkpoints (hpcdl: every epoch at any rank count; Horovod's "
        "recipe: rank 0 every epoch; the 1-rank Keras script: none), run-file writes, metric "
        "allreduces. 1 rank runs without mpirun on both sides (mpirun -np 1 pins to one core). "
        "Both sides run with OMPI_MCA_mpi_yield_when_idle=1 (hpcdl's own choice for ranks "
        "bound to one core, given to the recipe too). "
        "Goal: ratio <= 1.05.")


if __name__ == "__main__":
    main()
