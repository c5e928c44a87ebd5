"""The baselines hpcdl is measured against: a minimal Keras 2 script, and with --horovod the
plain recipe of Horovod's Keras example (init, pin GPU, shard, scale LR,
DistributedOptimizer, broadcast from rank 0, validate every epoch, rank 0 checkpoints every
epoch). Same model and batch as `hpcdl train`, data already in memory, each rank validating on
its share of the validation set (as hpcdl does). Prints one JSON line from rank 0: the
wall-clock time at each epoch's end (validation and checkpoint included) and the process's
wall time."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # Keras 2: Horovod needs it (stack.md)
STARTED = time.perf_counter()

import h5py
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--width", type=int, default=512)
parser.add_argument("--depth", type=int, default=2)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--learning-rate", type=float, default=0.001)
parser.add_argument("--horovod", action="store_true")
args = parser.parse_args()

rank, size = 0, 1
if args.horovod:
    import horovod.tensorflow.keras as hvd
    from mpi4py import MPI  # noqa: F401  (before hvd.init, stack.md)

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")

with h5py.File(args.data, "r") as f:
    n = f["train/y"].shape[0] // size
    x = f["train/x"][rank * n:(rank + 1) * n].astype(np.float32) / 255.0
    y = f["train/y"][rank * n:(rank + 1) * n]
    n_val = f["val/y"].shape[0] // size
    val_x = f["val/x"][rank * n_val:(rank + 1) * n_val].astype(np.float32) / 255.0
    val_y = f["val/y"][rank * n_val:(rank + 1) * n_val]

tf.keras.utils.set_random_seed(0)
layers = [tf.keras.layers.Flatten(input_shape=x.shape[1:])]
layers += [tf.keras.layers.Dense(args.width, activation="relu") for _ in range(args.depth)]
model = tf.keras.Sequential([*layers, tf.keras.layers.Dense(10, activation="softmax")])
optimizer = tf.keras.optimizers.Adam(args.learning_rate * size)
callbacks: list = []
if args.horovod:
    optimizer = hvd.DistributedOptimizer(optimizer)
    callbacks.append(hvd.callbacks.BroadcastGlobalVariablesCallback(0))
    # The recipe saves checkpoints on rank 0 only, every epoch (hpcdl does too).
    if rank == 0:
        checkpoints = tempfile.mkdtemp()
        callbacks.append(tf.keras.callbacks.ModelCheckpoint(checkpoints + "/checkpoint-{epoch}.h5"))
model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


class EpochEnds(tf.keras.callbacks.Callback):
    """Last in the list: runs after validation and after the checkpoint."""

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        ends.append(time.perf_counter() - STARTED)


ends: list[float] = []
model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0,
          validation_data=(val_x, val_y), callbacks=[*callbacks, EpochEnds()])
if rank == 0:
    print(json.dumps({"epoch_ends": ends, "wall_seconds": time.perf_counter() - STARTED}))
