"""Benchmark 8: streaming the training shard from the dataset file vs holding it in memory.

(a) Epoch time `train.input: stream` / `memory`, Fashion-MNIST MLP (demo.yaml) and CNN
    (fashion_cnn.yaml), 1 and 2 ranks, page cache warm; runs alternate memory, stream, memory...
    in one session, so a shared machine slows both alike. Figure: median epoch_seconds, epoch 1
    (tracing) left out. Goal <= 1.10.
(b) Cold cache: the streaming reader reading a whole train split vs `dd` of the same file, caches
    dropped (echo 3 > /proc/sys/vm/drop_caches) before each. Figure: file bytes per second,
    reader / dd. Goal >= 0.8.
(c) Decompression MB/s per core (one thread, warm cache) for gzip levels, lzf and none, and the
    compression ratio, on Fashion-MNIST's train images as `hpcdl prepare` writes them.
(d) Threads vs processes for reading: h5py serialises its calls through one lock, zlib
    releases the GIL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import FASHION_MNIST, REPO, append_results, fashion_mnist, run, summary

sys.path.insert(0, str(REPO))

MODELS = {"MLP": "demo.yaml", "CNN": "fashion_cnn.yaml"}
FILTERS = {"gzip 1": ["--compression", "gzip", "--compression-level", "1"],
           "gzip 4": ["--compression", "gzip", "--compression-level", "4"],
           "gzip 9": ["--compression", "gzip", "--compression-level", "9"],
           "lzf": ["--compression", "lzf"], "none": ["--compression", "none"]}


def prepared(work: Path, filter_name: str) -> Path:
    """A results dir whose fashion_mnist.h5 `hpcdl prepare` wrote with FILTERS[filter_name]
    ("default": no option)."""
    results = work / filter_name.replace(" ", "")
    out = results / "data" / "fashion_mnist.h5"
    if not out.exists():
        options = [] if filter_name == "default" else FILTERS[filter_name]
        run(["hpcdl", "prepare", "fashion_mnist", *options, "--out", str(out)])
    return results


# (a)'s modes: train.input and the filter of the file it reads ("default": prepare's own)
MODES = {"memory": ("memory", "default"), "stream": ("stream", "default"),
         "stream, gzip 4": ("stream", "gzip 4")}


def epoch_seconds(model: str, ranks: int, mode: str, epochs: int,
                  work: Path) -> tuple[float, float]:
    """Median epoch_seconds of one `hpcdl train` run, epoch 1 left out; final val accuracy."""
    from hpcdl import store

    out = work / f"{model}-{ranks}-{mode.replace(', ', '-').replace(' ', '')}.h5"
    out.unlink(missing_ok=True)
    launch = ["mpirun", "-np", str(ranks)] if ranks > 1 else []
    train_input, filter_name = MODES[mode]
    results = prepared(work, filter_name)
    run([*launch, "hpcdl", "train", "--config", str(REPO / "configs" / MODELS[model]),
         f"--set=epochs={epochs}", f"--set=train.input={train_input}",
         "--set=intra_op_threads=0", f"--set=results_dir={results}", "--out", str(out)])
    record = store.read_run(out)
    return statistics.median(record.epochs["epoch_seconds"][1:]), record.epochs["val_accuracy"][-1]


def epoch_ratios(models: list[str], modes: list[str], reps: int, epochs: int,
                 work: Path) -> list[list[str]]:
    """Runs alternate between the modes, rep by rep; a mode not run shows as '-'."""
    rows = [["model, ranks", "memory s/epoch", "stream s/epoch", "stream / memory",
             "stream gzip 4 / memory", "val acc memory / stream"]]
    for model in models:
        for ranks in (1, 2):
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            accuracy: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(reps):
                for mode in modes:
                    seconds, val = epoch_seconds(model, ranks, mode, epochs, work)
                    times[mode].append(seconds)
                    accuracy[mode].append(val)
            ratios = {mode: summary([s / m for s, m in zip(times[mode], times["memory"],
                                                          strict=True)])
                      for mode in modes if mode != "memory"}
            rows.append([f"{model}, {ranks}", summary(times["memory"]), summary(times["stream"]),
                         ratios["stream"], ratios.get("stream, gzip 4", "-"),
                         f"{statistics.median(accuracy['memory']):.4f} / "
                         f"{statistics.median(accuracy['stream']):.4f}"])
    return rows


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def reader_seconds(path: Path) -> float:
    """The streaming reader over the whole train split, caches dropped first."""
    from hpcdl import data, stream

    rows = data.dataset_info(path).sizes["train"]
    layout = stream.ShardLayout.of(path, [("train", 0, rows)])
    drop_caches()
    start = time.perf_counter()
    with stream.Reader(layout) as reader:
        for block in layout.blocks:
            reader.read([block])
    return time.perf_counter() - start


def dd_seconds(path: Path) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def tiled_fashion_mnist(work: Path, copies: int, filter_args: list[str], name: str) -> Path:
    """Fashion-MNIST's train images `copies` times over, prepared with `filter_args`."""
    import h5py

    source = work / "tiled-source.h5"
    if not source.exists():
        with h5py.File(FASHION_MNIST) as handle:
            x, y = handle["train/x"][()], handle["train/y"][()]
        with h5py.File(source, "w") as handle:
            handle["x"] = np.concatenate([x] * copies)
            handle["y"] = np.concatenate([y] * copies)
    out = work / f"{name}.h5"
    run(["hpcdl", "prepare", f"hdf5:{source}", "--out", str(out), "--force", *filter_args])
    return out


def cold_reads(work: Path, copies: int, reps: int) -> list[list[str]]:
    rows = [["file", "size MB", "reader MB/s", "dd MB/s", "reader / dd"]]
    for name in ("none", "gzip 4"):
        path = tiled_fashion_mnist(work, copies, FILTERS[name], name.replace(" ", ""))
        size = path.stat().st_size / 1e6
        reader, dd = [], []
        for _ in range(reps):
            reader.append(size / reader_seconds(path))
            dd.append(size / dd_seconds(path))
        ratios = [r / d for r, d in zip(reader, dd, strict=True)]
        rows.append([name, f"{size:.0f}", summary(reader), summary(dd), summary(ratios)])
        path.unlink()
    return rows


def decode_rates(work: Path, reps: int) -> list[list[str]]:
    """One thread, warm cache: MB of images a second through the reader, and file size."""
    from hpcdl import data, stream

    rows = [["filter", "file MB", "ratio", "decoded MB/s per core", "path"]]
    for name, args in FILTERS.items():
        path = tiled_fashion_mnist(work, 1, args, name.replace(" ", ""))
        n = data.dataset_info(path).sizes["train"]
        layout = stream.ShardLayout.of(path, [("train", 0, n)])
        raw = n * 784 / 1e6
        rates = []
        saved, stream.DECODE_THREADS = stream.DECODE_THREADS, 1
        for _ in range(reps + 1):  # the first read warms the cache
            start = time.perf_counter()
            with stream.Reader(layout) as reader:
                reader.read(layout.blocks)
            rates.append(raw / (time.perf_counter() - start))
        stream.DECODE_THREADS = saved
        size = path.stat().st_size / 1e6  # all three splits: the ratio is of the whole file
        raw_all = sum(data.dataset_info(path).sizes.values()) * 784 / 1e6
        how = "h5py" if name == "lzf" else "read_direct_chunk"
        rows.append([name, f"{size:.1f}", f"{raw_all / size:.2f}", summary(rates[1:]), how])
    return rows


def _direct_read(path: str, lo: int, hi: int) -> None:
    """Chunks [lo, hi) of /train/x read raw and inflated: the reader's gzip path, alone."""
    import zlib

    import h5py

    with h5py.File(path) as handle:
        x = handle["train/x"]
        for chunk in range(lo, hi):
            zlib.decompress(x.id.read_direct_chunk((chunk * x.chunks[0], 0, 0, 0))[1])


def _h5py_read(path: str, lo: int, hi: int) -> None:
    import h5py

    with h5py.File(path) as handle:
        x = handle["train/x"]
        for chunk in range(lo, hi, 4):
            x[chunk * x.chunks[0]:(chunk + 4) * x.chunks[0]]


def threads_vs_processes(work: Path, reps: int) -> list[list[str]]:
    """MB/s of images inflated from one gzip 4 file by 1 or 2 threads or processes (warm)."""
    import h5py

    path = tiled_fashion_mnist(work, 4, FILTERS["gzip 4"], "gzip4-parallel")
    with h5py.File(path) as handle:
        x = handle["train/x"]
        chunks, raw = -(-len(x) // x.chunks[0]), x.size / 1e6
    rows = [["read", "1 worker MB/s", "2 threads MB/s", "2 processes MB/s"]]
    for name, read in (("read_direct_chunk + zlib", _direct_read), ("h5py slicing", _h5py_read)):
        rates: dict[str, list[float]] = {"1": [], "threads": [], "processes": []}
        for _ in range(reps):
            for kind, pool in (("1", None), ("threads", ThreadPoolExecutor),
                               ("processes", ProcessPoolExecutor)):
                start = time.perf_counter()
                if pool is None:
                    read(str(path), 0, chunks)
                else:
                    with pool(2) as workers:
                        halves = [(0, chunks // 2), (chunks // 2, chunks)]
                        list(workers.map(read, [str(path)] * 2, *zip(*halves, strict=True)))
                rates[kind].append(raw / (time.perf_counter() - start))
        rows.append([name, *(summary(rates[k]) for k in rates)])
    path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition, 3 epochs, MLP only for (a), 4x tiled file for (b)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="for (a)")
    parser.add_argument("--epochs", type=int, help="per run in (a), the first left out "
                        "(default 5, --quick 3)")
    parser.add_argument("--epochs-only", action="store_true", help="(a) alone")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="for (a); memory and stream always run")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    models = args.models or (["MLP"] if args.quick else list(MODELS))
    epochs = args.epochs or (3 if args.quick else 5)
    table: list[list[str]] = []
    with tempfile.TemporaryDirectory(dir=REPO / "results") as tmp:
        work = Path(tmp)
        if not args.epochs_only:  # (b)-(d) read the shared file; (a) prepares its own
            fashion_mnist()
            parallel = threads_vs_processes(work, max(2, reps))
            decode = decode_rates(work, max(2, reps))
            cold = cold_reads(work, 4 if args.quick else 16, max(2, reps))
            table = [[""] * 6, *[[*row, ""] for row in cold], [""] * 6,
                     *[[*row, ""] for row in decode], [""] * 6,
                     *[[*row, "", ""] for row in parallel]]
        modes = [*dict.fromkeys(["memory", "stream", *args.modes])]
        table = [*epoch_ratios(models, modes, reps, epochs, work), *table]
    load = os.getloadavg()
    append_results("8. Streaming input vs in memory", table,
                   NOTES + f"Load average at the end (1, 5, 15 min): {load[0]:.1f}, "
                   f"{load[1]:.1f}, {load[2]:.1f} (2 cores; a run alone keeps 1-2 busy).")


NOTES = """
Tables in one: (a) epoch_seconds (training only) of `hpcdl train` with train.input memory and
stream of the file `hpcdl prepare` writes by default (since 2026-12-03: no filter), and stream
of a gzip 4 file (prepare --compression gzip), alternated in one session, epoch 1 left out,
intra_op_threads 0, the default stream_buffer_mb (64); (b) the streaming reader
(stream.Reader, 2 decode threads) reading a whole train split of tiled Fashion-MNIST vs `dd
bs=4M` of the same file, page cache dropped before each; (c) one decode thread, warm cache,
over the 43200 train images of Fashion-MNIST's 60000 (test held out by prepare of an hdf5:
copy) in the layout `hpcdl prepare` writes with each filter ("ratio": raw image bytes / file
bytes); (d) the same gzip 4 file (4x tiled) inflated by one worker, two threads or two
processes, each reading half the chunks, warm cache: which parallelism the reader should use.
"""


if __name__ == "__main__":
    main()
