"""Horovod allreduce timing, run by bench_scaling.py under `mpirun` or `srun --mpi=pmix`.

Times `hvd.allreduce` (Sum) of one float32 tensor of each --sizes byte count, called eagerly:
the path gradients take in hpcdl's training (Horovod's background thread, then whatever
transport the launcher's MPI picked), without the model around it. Each timed iteration starts
after an MPI barrier and counts as the slowest rank's time, so no rank's early start hides the
wait for the others. Rank 0 prints one JSON line:
{"ranks", "hosts" (per rank), "seconds": {bytes: [per-iteration seconds]}}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # like hpcdl and baseline.py (stack.md)

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from mpi4py import MPI  # imported (MPI initialised) before hvd.init, stack.md


def time_allreduce(nbytes: int, warmup: int, iterations: int) -> list[float]:
    """Seconds of each timed allreduce of `nbytes` bytes, slowest rank, after a barrier."""
    tensor = tf.ones([nbytes // 4], dtype=tf.float32)
    name = f"bench.allreduce.{nbytes}"
    for _ in range(warmup):
        hvd.allreduce(tensor, op=hvd.Sum, name=name)
    seconds = []
    for _ in range(iterations):
        MPI.COMM_WORLD.Barrier()
        began = time.perf_counter()
        hvd.allreduce(tensor, op=hvd.Sum, name=name)  # eager: returns when the sum is there
        seconds.append(MPI.COMM_WORLD.allreduce(time.perf_counter() - began, op=MPI.MAX))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="message bytes")
    parser.add_argument("--iterations", type=int, default=10, help="timed, per size (>= 5)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    hvd.init(comm=MPI.COMM_WORLD)
    seconds = {n: time_allreduce(n, args.warmup, args.iterations) for n in args.sizes}
    check = hvd.allreduce(tf.constant([1.0]), op=hvd.Sum, name="bench.allreduce.check")
    if float(np.asarray(check)[0]) != hvd.size():
        raise SystemExit(f"allreduce of 1.0 over {hvd.size()} ranks gave {check}")
    hosts = MPI.COMM_WORLD.gather(os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    if hvd.rank() == 0:
        print(json.dumps({"ranks": hvd.size(), "hosts": hosts, "seconds": seconds}))


if __name__ == "__main__":
    main()
