"""Benchmark 2: data-parallel efficiency. The same MLP (784-512-512-10) trained by `hpcdl train`
at 1 and 2 ranks, one core and one TensorFlow thread per rank: weak scaling (batch 128 per rank)
and strong scaling (global batch 256); efficiency = samples/s(2) / (2 x samples/s(1)). Next to
them, to split the gap: 2 ranks with Open MPI busy-polling (its default), and the ceiling, two
independent 1-rank runs at once, one per core, no communication at all. Then
Horovod allreduce bandwidth, 4 KiB to 64 MiB, at 2 ranks on this node (shared memory) and at
4 ranks across the two emulated Slurm nodes (TCP), next to this machine's memory-copy bandwidth.
Goal: weak-scaling efficiency >= 0.90 at 2 ranks."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, append_results, env, fashion_mnist, run, summary

sys.path.insert(0, str(REPO))
ALLREDUCE = REPO / "benchmarks" / "allreduce.py"
CLUSTER = REPO / "tests" / "cluster"
SIZES = (4 * 2**10, 64 * 2**10, 2**20, 16 * 2**20, 64 * 2**20)
MEMCPY_BYTES = 256 * 2**20  # well past the CPU caches
# Open MPI between the two emulated nodes of one host: TCP on loopback, as in test_cluster.py
# (its shared-memory transport collides between the "nodes"). Their 4 ranks share 2 cores, which
# Slurm does not know (each node claims both): yield instead of busy-polling, as Open MPI does
# by itself when mpirun knows it oversubscribes (measured here: 5-10x faster allreduces).
MULTINODE_MPI = {
    "OMPI_MCA_btl": "self,tcp",
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}
WEAK_GOAL = 0.90


@dataclass(frozen=True)
class Setup:
    ranks: int
    batch: int  # per rank
    busy_poll: bool = False  # 2 ranks with Open MPI's default busy-polling (hpcdl turns it off)
    independent: bool = False  # 2 unconnected 1-rank runs, one per core: the machine's ceiling


ONE_128, ONE_256, TWO_128 = Setup(1, 128), Setup(1, 256), Setup(2, 128)
TWO_128_BUSY = Setup(2, 128, busy_poll=True)
PAIR_128 = Setup(1, 128, independent=True)
ONE_512, TWO_512 = Setup(1, 512), Setup(2, 512)  # 4x the compute per gradient allreduce


class Skipped(Exception):
    """A measurement that cannot be made on this machine; its row says why."""

    def __init__(self, why: str) -> None:
        super().__init__(" ".join(why.replace("|", "/").split()))  # one table cell


def shown(command: list[str]) -> str:
    """A command as a reader would type it from the repository root."""
    return shlex.join(command).replace(sys.executable, "python").replace(f"{REPO}/", "")


def train_command(setup: Setup, epochs: int, out: Path, core: int | None = None) -> list[str]:
    """`hpcdl train` with one core per rank: `mpirun` binds each of 2 ranks to a core; one
    rank alone would also use the second core (tf.data and Horovod threads), so taskset."""
    core = min(os.sched_getaffinity(0)) if core is None else core
    launch = (["mpirun", "-np", str(setup.ranks)] if setup.ranks > 1
              else ["taskset", "-c", str(core)])
    sets = {"width": 512, "depth": 2, "dropout": 0, "epochs": epochs, "batch_size": setup.batch,
            "intra_op_threads": 1, "results_dir": REPO / "results"}
    return [*launch, "hpcdl", "train", "--config", str(REPO / "configs" / "demo.yaml"),
            *(f"--set={key}={value}" for key, value in sets.items()), "--out", str(out)]


def samples_per_second(out: Path) -> list[float]:
    """Global samples/s of each epoch but the first (graph tracing)."""
    from hpcdl import store

    return [float(v) for v in store.read_run(out).epochs["samples_per_second"][1:]]


def measure(setup: Setup, epochs: int, out: Path) -> list[float]:
    """Samples/s per epoch of one launch; for the independent pair, the two runs' sum."""
    if not setup.independent:
        run(train_command(setup, epochs, out),
            **({"OMPI_MCA_mpi_yield_when_idle": "0"} if setup.busy_poll else {}))
        return samples_per_second(out)
    cores = sorted(os.sched_getaffinity(0))[:2]
    outs = [out.with_suffix(f".core{core}.h5") for core in cores]
    jobs = [subprocess.Popen(train_command(setup, epochs, o, core), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for core, o in zip(cores, outs, strict=True)]
    for job in jobs:
        _, stderr = job.communicate()
        if job.returncode != 0:
            sys.exit(f"benchmark step failed: {shlex.join(job.args)}\n{stderr[-3000:]}")
    return [a + b for a, b in zip(*map(samples_per_second, outs), strict=True)]


def memcpy_bandwidth(reps: int) -> list[float]:
    """Bytes copied per second by one thread (np.copyto), pages touched beforehand."""
    src = np.ones(MEMCPY_BYTES // 8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    rates = []
    for _ in range(reps):
        began = time.perf_counter()
        np.copyto(dst, src)
        rates.append(MEMCPY_BYTES / (time.perf_counter() - began))
    return rates


def allreduce_args(iterations: int, warmup: int) -> list[str]:
    return [sys.executable, str(ALLREDUCE), "--sizes", *map(str, SIZES),
            "--iterations", str(iterations), "--warmup", str(warmup)]


def result_line(stdout: str) -> dict[str, Any]:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def slurm_allreduce(command: list[str]) -> dict[str, Any]:
    """Run `command` (an srun) on the local two-node Slurm cluster; start the cluster with
    tests/cluster/slurm-up.sh if it is down, and stop it again afterwards (leave it as found)."""
    was_up = bool(shutil.which("sinfo")) and subprocess.run(
        ["sinfo"], capture_output=True, check=False).returncode == 0
    if not was_up:
        up = subprocess.run(["bash", str(CLUSTER / "slurm-up.sh")], capture_output=True,
                            text=True, timeout=600, check=False)
        if up.returncode != 0:
            raise Skipped(f"tests/cluster/slurm-up.sh failed: {up.stderr.strip()[-300:]}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                              env=env(**MULTINODE_MPI), check=False)
    except subprocess.TimeoutExpired as exc:
        raise Skipped("srun did not finish within 900 s") from exc
    finally:
        if not was_up:
            subprocess.run(["bash", str(CLUSTER / "slurm-down.sh")], capture_output=True,
                           timeout=120, check=False)
    if done.returncode != 0:
        raise Skipped(f"srun failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    result = result_line(done.stdout)
    if len(set(result["hosts"])) < 2:
        raise Skipped(f"the ranks did not span two nodes: {result['hosts']}")
    return result


def bandwidth_rows(label: str, result: dict[str, Any], memcpy: float) -> list[list[str]]:
    """One row per message size: time, algorithm and bus bandwidth (NCCL-tests' convention:
    busbw = algbw x 2(n-1)/n, the bytes each rank must move in a ring allreduce)."""
    n = result["ranks"]
    rows = []
    for size in SIZES:
        seconds = result["seconds"][str(size)]
        algbw = [size / s / 1e9 for s in seconds]
        busbw = statistics.median(algbw) * 2 * (n - 1) / n
        rows.append([label, f"{size // 2**10} KiB" if size < 2**20 else f"{size // 2**20} MiB",
                     f"{statistics.median(seconds) * 1e3:.3g}", summary(algbw),
                     f"{busbw:.3g}", f"{busbw / memcpy:.2g}"])
    return rows


def scaling(reps: int, epochs: int) -> tuple[list[list[str]], str]:
    """Weak and strong scaling table and its notes; launches alternated, order reversed
    every other repetition."""
    setups = (ONE_128, ONE_256, TWO_128, TWO_128_BUSY, PAIR_128, ONE_512, TWO_512)
    speeds: dict[Setup, list[list[float]]] = {setup: [] for setup in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for n, setup in enumerate(setups if rep % 2 == 0 else setups[::-1]):
                out = Path(tmp) / f"{n}-{rep}.h5"
                speeds[setup].append(measure(setup, epochs, out))

    def pooled(setup: Setup) -> list[float]:
        return [v for launch in speeds[setup] for v in launch]

    def efficiency(one: Setup, two: Setup) -> list[float]:
        """Epoch j of the 2-core launch over epoch j of the 1-rank launch, same repetition."""
        return [b / (2 * a) for la, lb in zip(speeds[one], speeds[two], strict=True)
                for a, b in zip(la, lb, strict=True)]

    weak = efficiency(ONE_128, TWO_128)
    met = "met" if statistics.median(weak) >= WEAK_GOAL else "not met"
    table = [["mode", "ranks", "batch per rank (global)", "samples/s", "efficiency", "goal"],
             ["weak", "1", "128 (128)", summary(pooled(ONE_128)), "-", ""],
             ["weak", "2", "128 (256)", summary(pooled(TWO_128)), summary(weak),
              f">= {WEAK_GOAL}: **{met}**"],
             ["weak, Open MPI busy-polling (`OMPI_MCA_mpi_yield_when_idle=0`)", "2", "128 (256)",
              summary(pooled(TWO_128_BUSY)), summary(efficiency(ONE_128, TWO_128_BUSY)), "-"],
             ["ceiling: 2 independent 1-rank runs, one per core, no communication", "2 x 1",
              "128 (-)", summary(pooled(PAIR_128)), summary(efficiency(ONE_128, PAIR_128)), "-"],
             ["weak", "1", "512 (512)", summary(pooled(ONE_512)), "-", ""],
             ["weak", "2", "512 (1024)", summary(pooled(TWO_512)),
              summary(efficiency(ONE_512, TWO_512)), "-"],
             ["strong", "1", "256 (256)", summary(pooled(ONE_256)), "-", ""],
             ["strong", "2", "128 (256)", summary(pooled(TWO_128)),
              summary(efficiency(ONE_256, TWO_128)), "-"]]
    commands = "`, `".join(shown(train_command(s, epochs, Path("run.h5")))
                           for s in (ONE_128, ONE_256, TWO_128))
    notes = (
        f"`hpcdl train`, MLP 784-512-512-10 (dropout 0), Adam, Fashion-MNIST (54000 train), "
        f"{epochs} epochs per launch, epoch 1 (graph tracing) excluded; samples/s is the run "
        f"file's global `samples_per_second` of each epoch (Keras fit time, validation not "
        f"included), pooled over {reps} repetitions "
        f"(n = {reps} x {epochs - 1} epochs). Each repetition runs the seven launches in turn, "
        f"the order reversed every other repetition: `{commands}`, the 2-rank one again with "
        "`OMPI_MCA_mpi_yield_when_idle=0` (Open MPI's default, which hpcdl overrides for ranks "
        "bound to one core), the 1-rank one twice at once under `taskset -c 0` and "
        "`taskset -c 1` (their samples/s summed), and the 1- and 2-rank ones at batch 512 per "
        "rank (4x the compute per gradient allreduce). One core per rank: "
        "`intra_op_threads=1` caps TensorFlow's intra- and inter-op pools, mpirun binds each "
        "of the 2 ranks to its own core (its default for <= 2 ranks), and the 1-rank run, "
        "which without mpirun also spreads tf.data threads over the second core, is pinned "
        "with taskset. The 2-rank "
        "launches serve both modes (2 x 128 = 256). Efficiency = samples/s(2) / "
        "(2 x samples/s(1)) of epoch j of the 2-core launch and epoch j of the 1-rank launch of "
        "the same repetition; the independent pair is the most any 2-rank run can reach on "
        f"these two cores. Goal: weak-scaling efficiency >= {WEAK_GOAL}.")
    return table, notes


def allreduce(iterations: int, warmup: int) -> tuple[list[list[str]], str]:
    """Allreduce bandwidth table and its notes: 2 ranks here, 4 over the Slurm nodes, memcpy."""
    memcpy = memcpy_bandwidth(10)
    memcpy_gbs = statistics.median(memcpy) / 1e9
    same_node = ["mpirun", "-np", "2", *allreduce_args(iterations, warmup)]
    srun = ["srun", "-N", "2", "-n", "4", "--mpi=pmix", "--immediate=120",
            *allreduce_args(iterations, warmup)]
    table = [["ranks, transport", "message", "ms", "algbw GB/s", "busbw GB/s", "busbw / memcpy"]]
    table += bandwidth_rows("2 ranks, 1 node, shared memory", result_line(run(same_node).stdout),
                            memcpy_gbs)
    try:
        cluster = slurm_allreduce(srun)
        table += bandwidth_rows(f"4 ranks on {','.join(cluster['hosts'])}, TCP over loopback",
                                cluster, memcpy_gbs)
    except Skipped as exc:
        print(f"bench_scaling: 4-rank allreduce across the Slurm nodes skipped: {exc}")
        table.append([f"4 ranks, 2 Slurm nodes: **skipped**: {exc}", "-", "-", "-", "-", "-"])
    table.append(["memory copy, 1 thread (np.copyto)", f"{MEMCPY_BYTES // 2**20} MiB",
                  f"{MEMCPY_BYTES / statistics.median(memcpy) * 1e3:.3g}",
                  summary([r / 1e9 for r in memcpy]), "-", "1"])
    env_vars = " ".join(f"{k}={v}" for k, v in MULTINODE_MPI.items())
    notes = (
        f"`benchmarks/allreduce.py`: eager `hvd.allreduce` (Sum) of one float32 tensor per size, "
        f"{warmup} warm-up and {iterations} timed iterations per size, each after an MPI barrier "
        "and counted as the slowest rank's time. algbw = bytes / time; busbw = algbw x 2(n-1)/n "
        f"(NCCL-tests' convention). Same node: `{shown(same_node)}` (Open MPI's shared-memory "
        f"transport, ranks bound to cores). Across the two emulated nodes: `{env_vars} "
        f"{shown(srun)}` on the local cluster of tests/cluster/slurm-up.sh (started and stopped "
        "by this script if it was down). n1 and n2 are two slurmd on this one host: all 4 ranks "
        "talk TCP over loopback (same-node pairs too) and share its 2 cores, hence "
        "yield_when_idle (Open MPI's own choice when it knows it oversubscribes). Memory copy: "
        f"np.copyto of {MEMCPY_BYTES // 2**20} MiB by one thread, 10 repetitions, bytes copied "
        "per second (the memory traffic is twice that: read + write), the ceiling for data one "
        "core moves within this machine.")
    return table, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition of 2 epochs; 5 allreduce iterations per size")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    reps, epochs = (1, 2) if args.quick else (args.reps, args.epochs)
    iterations, warmup = (5, 2) if args.quick else (20, 5)
    fashion_mnist()
    scaling_table, scaling_notes = scaling(reps, epochs)
    allreduce_table, allreduce_notes = allreduce(iterations, warmup)
    append_results("2. Data-parallel efficiency: 1 vs 2 ranks", scaling_table,
                   scaling_notes)
    append_results("2. Allreduce bandwidth: Horovod vs memory copy", allreduce_table,
                   allreduce_notes)


if __name__ == "__main__":
    main()
