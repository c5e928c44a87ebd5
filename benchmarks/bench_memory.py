"""Benchmark 6: peak resident memory per rank, 1 vs 2 ranks, Fashion-MNIST MLP. Each rank
must hold only its shard: the per-rank peak should drop by about half the training data's
in-memory size when going from 1 to 2 ranks, never grow."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import FASHION_MNIST, REPO, append_results, fashion_mnist, run, summary

sys.path.insert(0, str(REPO))


def peak_per_rank(ranks: int, work: Path) -> list[float]:
    from hpcdl import store

    out = work / f"mem-{ranks}.h5"
    out.unlink(missing_ok=True)
    run(["mpirun", "-np", str(ranks), "hpcdl", "train", "--config",
         str(REPO / "configs" / "demo.yaml"), "--set=epochs=1", "--set=width=512",
         f"--set=results_dir={REPO}/results", "--out", str(out)])
    return store.read_run(out).attrs["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repetition")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    fashion_mnist()
    from hpcdl import data

    info = data.dataset_info(FASHION_MNIST)
    train_mb = info.sizes["train"] * 28 * 28 / 2**20  # uint8 as stored and held
    peaks: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            for ranks in (1, 2):
                peaks[ranks].append(statistics.median(peak_per_rank(ranks, Path(tmp))))
    table = [["ranks", "peak RSS per rank (MiB)", "train data per rank (MiB, uint8)"],
             ["1", summary(peaks[1]), f"{train_mb:.1f}"],
             ["2", summary(peaks[2]), f"{train_mb / 2:.1f}"]]
    drop = statistics.median(peaks[1]) - statistics.median(peaks[2])
    append_results(
        "6. Memory per rank",
        table, f"`hpcdl train`, MLP 784-512-512-10, 1 epoch, peak RSS (getrusage) of each rank as "
        f"recorded in the run file (`peak_rss_mb`). Going from 1 to 2 ranks the per-rank peak "
        f"fell by {drop:.1f} MiB (the train shard halves: {train_mb / 2:.1f} MiB less to hold, "
        "plus its tf.constant copy); most of a rank's memory is TensorFlow itself.")


if __name__ == "__main__":
    main()
