"""`hpcdl scaling`: the best (or given) params trained at 1, 2, 4 ... ranks for a fixed number
of epochs -> <sweep>/scaling.h5 (ranks, samples/s, speed-up, parallel efficiency).

Each rank count is its own launch (`mpirun -n R` locally, `srun -n R` inside a Slurm
allocation). The per-rank batch stays fixed, so the global batch grows with the ranks (the
way Horovod scales); epoch 1 (graph tracing, first broadcast) is left out of the timing.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from hpcdl import store
from hpcdl.config import Config
from hpcdl.errors import UserError

log = logging.getLogger("hpcdl.scaling")


def measure(config: Config, params: dict[str, Any], launcher: str, rank_exec: str = "") -> Path:
    """Train at every rank count of resources.scaling_ranks; write scaling.h5."""
    res = config.section("resources")
    epochs = res["scaling_epochs"]
    if epochs < 2:
        raise UserError(f"{config.origin}: resources.scaling_epochs: {epochs}; need >= 2 (the "
                        "first epoch traces the graph and is not timed)")
    config_file = config.paths.config_file
    rows = []
    for ranks in sorted(set(res["scaling_ranks"])):
        out = config.paths.scaling_run(ranks)
        out.unlink(missing_ok=True)
        sets = [f"--set={k}={v}" for k, v in {**params, "epochs": epochs}.items()]
        command = [*shlex.split(launcher), "-n", str(ranks), *shlex.split(rank_exec), "hpcdl",
                   "train", "--config", str(config_file), *sets, "--out", str(out)]
        log.info("scaling: %d ranks: %s", ranks, shlex.join(command))
        done = subprocess.run(command, check=False)
        if done.returncode != 0:
            raise UserError(f"scaling run at {ranks} ranks failed (exit {done.returncode}): "
                            f"{shlex.join(command)}")
        run = store.read_run(out)
        timed = run.epochs["samples_per_second"][1:]
        rows.append((ranks, float(np.median(timed)),
                     float(np.median(run.epochs["epoch_seconds"][1:]))))
    ranks_, speed, seconds = (np.array(column) for column in zip(*rows, strict=True))
    speedup = speed / speed[0] * ranks_[0]
    out = config.paths.scaling_h5
    store.write_scaling(out, {"params": str(params), "epochs": epochs, "launcher": launcher,
                              "mode": "fixed per-rank batch (global batch grows with ranks)"},
                        {"ranks": ranks_, "samples_per_second": speed, "epoch_seconds": seconds,
                         "speedup": speedup, "efficiency": speedup / ranks_})
    for r, s, e in zip(ranks_, speed, speedup / ranks_, strict=True):
        log.info("scaling: %d ranks: %.0f samples/s, efficiency %.2f", r, s, e)
    return out
