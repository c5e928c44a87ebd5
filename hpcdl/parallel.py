"""Where this process runs and how ranks talk: the only module that imports Horovod.

Follows Horovod's Keras recipe (init, pin GPU by local rank, scale the learning rate, wrap the
optimizer, broadcast from rank 0, average metrics), wrapped so the rest of hpcdl asks one object
(`Ranks`) for rank / size / local rank / job id whether launched by mpirun, srun or plain
python. Also what the stack is (`versions`, `horovod_build`), as only this module may ask Horovod.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from hpcdl import __version__
from hpcdl.errors import UserError

LR_SCALING_RULES = ("linear", "sqrt", "none")
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: as the launcher announced it in the environment
    (`detect_launch`, readable before MPI starts), then as Horovod sees it after `init`."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str  # "mpirun", "srun", "pmix" or "single"
    job_id: str | None
    host: str

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def detect_launch(env: Mapping[str, str] | None = None) -> Ranks:
    """Read rank variables of Open MPI, Slurm's srun (PMIx) or none (one process)."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if job_id and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{job_id}_{env['SLURM_ARRAY_TASK_ID']}"
    host = env.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's name for the node
    if "OMPI_COMM_WORLD_RANK" in env:
        return Ranks(
            int(env["OMPI_COMM_WORLD_RANK"]),
            int(env["OMPI_COMM_WORLD_SIZE"]),
            int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)),
            "mpirun",
            job_id,
            host,
        )
    # SLURM_STEP_NUM_TASKS exists only inside an srun step, not in the batch script itself.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        local_size = int(env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
        return Ranks(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_STEP_NUM_TASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            local_size,
            "srun",
            job_id,
            host,
        )
    if "PMIX_RANK" in env and "PMIX_SIZE" in env:
        return Ranks(int(env["PMIX_RANK"]), int(env["PMIX_SIZE"]), 0, 1, "pmix", job_id, host)
    return Ranks(0, 1, 0, 1, "single", job_id, host)


def quiet_idle_waits(env: MutableMapping[str, str], cores: int, local_ranks: int) -> None:
    """A rank with at most one core of its own must not spin while it waits for messages: Open
    MPI busy-polls by default, and on the rank's only core that takes turns away from TensorFlow
    and from Horovod's background thread (measured: weak-scaling efficiency 0.52 -> 0.65 at 2
    ranks, benchmarks/RESULTS.md). `cores` is what the rank may run on: one when the launcher
    bound it, the whole node when it did not (then the node's ranks share them). Open MPI reads
    this when MPI starts; a user's own setting wins."""
    if cores <= local_ranks:
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


def horovod_keras() -> Any:
    """`horovod.tensorflow.keras`, imported with tf-keras standing in for `keras`.

    Horovod 0.28 does `from keras import backend`, which under TensorFlow >= 2.16 loads Keras 3:
    1-2.6 s more start-up in every rank of every job (measured), and the backend of models
    hpcdl never builds. Its callbacks (broadcast, warm-up) act on our tf-keras models, so
    tf-keras's backend is the one they should use; Keras 3 is never loaded.
    """
    if "horovod.tensorflow.keras" not in sys.modules:
        import tf_keras

        keras = sys.modules.get("keras")
        sys.modules["keras"] = tf_keras
        try:
            import horovod.tensorflow.keras  # noqa: F401
        finally:
            if keras is None:
                del sys.modules["keras"]
            else:
                sys.modules["keras"] = keras
    return sys.modules["horovod.tensorflow.keras"]


_ranks: Ranks | None = None
_control_comm: Any = None  # a private MPI communicator for cheap Python-level agreement


def init(threads_per_rank: int = 0) -> Ranks:
    """Start MPI (mpi4py first, stack.md) and Horovod; check Horovod sees what the launcher set.

    threads_per_rank > 0 caps TensorFlow's thread pools, which is only possible before
    TensorFlow runs its first op (Horovod's init runs some), so it is done here.
    """
    global _ranks, _control_comm
    if _ranks is not None:
        return _ranks
    launch = detect_launch()
    if launch.size > 1:
        quiet_idle_waits(os.environ, len(os.sched_getaffinity(0)), launch.local_size)
    if threads_per_rank:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads_per_rank)
        tf.config.threading.set_inter_op_parallelism_threads(threads_per_rank)
    hvd = horovod_keras()
    from mpi4py import MPI  # must initialise MPI before Horovod does (stack.md)

    hvd.init(comm=MPI.COMM_WORLD)
    if hvd.size() != launch.size:
        raise UserError(
            f"{launch.launcher} started {launch.size} ranks but Horovod sees {hvd.size()}: "
            "Horovod's MPI does not match the launcher (under srun use --mpi=pmix with an "
            "Open MPI built for PMIx)"
        )
    _control_comm = MPI.COMM_WORLD.Dup()
    _ranks = Ranks(
        hvd.rank(),
        hvd.size(),
        hvd.local_rank(),
        hvd.local_size(),
        launch.launcher,
        launch.job_id,
        launch.host,
    )
    return _ranks


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank; a few microseconds via plain MPI.

    Used every few batches so that a signal seen by one rank stops all ranks after the same
    batch (a rank that stops alone leaves the others waiting forever in the next gradient
    allreduce).
    """
    if init().size == 1:
        return flag
    from mpi4py import MPI

    return bool(_control_comm.allreduce(int(flag), op=MPI.MAX))


def abort_job(code: int = 1) -> None:
    """End every rank of the job: one rank failing alone would leave the rest in an allreduce."""
    if _ranks is not None and _ranks.size > 1:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)


def _id_list(value: str | None) -> list[str]:
    """A comma-separated GPU list as CUDA and Slurm write it ("0,1"); "" and unset: none."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@dataclass(frozen=True)
class Placement:
    """Which GPU a rank drives: what it was given and the device it pins (or, with no real
    GPU, would pin). One per rank in every run file (store.py's `placement` attribute)."""

    host: str
    rank: int
    local_rank: int
    cuda_visible_devices: str | None  # as the rank was given it; None = unset
    slurm_gpus: str | None  # SLURM_STEP_GPUS (inside a step) or SLURM_JOB_GPUS
    device: int | None  # index among the GPUs the rank sees (TensorFlow's GPU:<device>)
    gpu: str | None  # that GPU's id in its node's numbering: what two ranks must not share

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gpu_placement(ranks: Ranks, env: Mapping[str, str], detected: int = 0) -> Placement:
    """One task per GPU: the rank pins GPU `local_rank % n` of the n it sees, whether Slurm
    shows it one GPU (--gpus-per-task, cgroup-constrained devices) or all of its node's
    (--gpus-per-node, --gres). `detected`: the GPUs TensorFlow sees; with none (no driver,
    emulated GPUs) the rank sees the ones CUDA_VISIBLE_DEVICES names.

    The GPU's node-wide id: its CUDA_VISIBLE_DEVICES entry; when Slurm's list has as many
    entries, the matching one of Slurm's (devices constrained by cgroup are renumbered from 0
    in CUDA_VISIBLE_DEVICES, not in SLURM_STEP_GPUS).
    """
    given = env.get("CUDA_VISIBLE_DEVICES")
    slurm = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")
    visible, node_ids = _id_list(given), _id_list(slurm)
    if given is None:
        visible = node_ids
    seen = detected or len(visible)
    device = ranks.local_rank % seen if seen else None
    gpu = None
    if device is not None:
        if len(node_ids) == len(visible) and device < len(node_ids):
            gpu = node_ids[device]
        elif device < len(visible):
            gpu = visible[device]
        else:  # GPUs found by TensorFlow with no list given: its numbering is the node's
            gpu = str(device)
    return Placement(ranks.host, ranks.rank, ranks.local_rank, given, slurm, device, gpu)


def placement_conflicts(placements: list[Placement]) -> list[str]:
    """Each GPU driven by more than one rank of a node: "ranks 0 and 1 on n3 both pin GPU 0"."""
    by_gpu: dict[tuple[str, str], list[int]] = {}
    for placement in placements:
        if placement.gpu is not None:
            by_gpu.setdefault((placement.host, placement.gpu), []).append(placement.rank)
    return [f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]} on {host} both pin "
            f"GPU {gpu}" for (host, gpu), ranks in by_gpu.items() if len(ranks) > 1]


def place_ranks(ranks: Ranks) -> tuple[list[Placement], str | None]:
    """Collective: pin this rank's GPU (if TensorFlow sees one), then every rank's placement in
    rank order, and the TensorFlow device pinned (None without a GPU). Two ranks of a node on
    one GPU is a UserError on every rank, before any training. The pin comes first: TensorFlow
    refuses to change visible devices once an op (the gather's) has run."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    mine = gpu_placement(ranks, os.environ, len(gpus))
    device = None
    if mine.device is not None and gpus:
        gpu = gpus[mine.device]
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")
        device = gpu.name
    placements = allgather_object(mine, "parallel.placement")
    conflicts = placement_conflicts(placements)
    if conflicts:
        raise UserError(f"GPU placement: {'; '.join(conflicts)} (one rank per GPU: ask Slurm "
                        "for as many GPUs per node as ranks per node)")
    return placements, device


def scaled_learning_rate(base: float, size: int, rule: str) -> float:
    """Learning rate for `size` ranks: the global batch grows with size, so the step may too."""
    if rule == "linear":
        return base * size
    if rule == "sqrt":
        return base * math.sqrt(size)
    if rule == "none":
        return base
    raise ValueError(f"unknown learning-rate scaling {rule!r}; expected one of {LR_SCALING_RULES}")


def distributed_optimizer(optimizer: Any) -> Any:
    """Wrap a Keras 2 optimizer so gradients are averaged over ranks before each step.

    Alone there is nothing to average, and Horovod's background thread would only cost time.
    """
    if init().size == 1:
        return optimizer
    return horovod_keras().DistributedOptimizer(optimizer)


def average_gradients(grads: Sequence[Any]) -> list[Any]:
    """Each gradient averaged over ranks, one allreduce per tensor as Horovod's
    DistributedOptimizer does: for a step whose gradients XLA computed (xla.py), as Horovod
    0.28's allreduce has no XLA CPU kernel. None (a variable the loss does not use) stays None."""
    import horovod.tensorflow as hvd

    return [None if grad is None else hvd.allreduce(grad, op=hvd.Average) for grad in grads]


def sync_callbacks(initial_lr: float, warmup_epochs: float, steps_per_epoch: int,
                   size: int) -> tuple[list[Any], list[Any]]:
    """Keras callbacks (broadcast, warm-up): rank 0's initial weights to every rank (not
    needed alone), and the learning rate ramped up over the warm-up epochs."""
    hvd = horovod_keras()

    broadcast = [hvd.callbacks.BroadcastGlobalVariablesCallback(0)] if size > 1 else []
    warmup = [hvd.callbacks.LearningRateWarmupCallback(
        initial_lr=initial_lr, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch,
        verbose=0)] if warmup_epochs > 0 else []
    for callback in broadcast + warmup:
        # their batch hooks read no metrics: without this flag Keras copies the logs to NumPy
        # after every batch, a sync that cost ~20 % of an epoch (benchmarks/RESULTS.md)
        callback._supports_tf_logs = True
    return broadcast, warmup


def allreduce_sum(values: np.ndarray, name: str) -> np.ndarray:
    """Element-wise sum over ranks (Horovod's MetricAverageCallback is broken on tf-keras 2.18)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    total = hvd.allreduce(tf.constant(np.asarray(values, dtype=np.float64)), op=hvd.Sum, name=name)
    return np.asarray(total)


def allreduce_mean(values: Mapping[str, float], name: str) -> dict[str, float]:
    """Average each named scalar over ranks (keys must be the same, in the same order, on all)."""
    keys = sorted(values)
    totals = allreduce_sum(np.array([values[k] for k in keys]), name)
    size = init().size
    return {k: float(t) / size for k, t in zip(keys, totals, strict=True)}


def broadcast_object(obj: Any, name: str, root: int = 0) -> Any:
    """Send a picklable Python value from `root` to every rank."""
    import horovod.tensorflow as hvd

    return hvd.broadcast_object(obj, root_rank=root, name=name)


def on_root(step: Callable[[], T], name: str) -> T | None:
    """Run `step` on rank 0 only; if it fails with a UserError, raise it on every rank.

    Without this, rank 0 would exit with the error while the other ranks wait forever in the
    next collective.
    """
    problem: str | None = None
    result: T | None = None
    if init().is_root:
        try:
            result = step()
        except UserError as exc:
            problem = str(exc)
    problem = broadcast_object(problem, name)
    if problem is not None:
        raise UserError(problem)
    return result


def allgather_object(obj: Any, name: str) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    import horovod.tensorflow as hvd

    return hvd.allgather_object(obj, name=name)


def mpi_library() -> str:
    """The MPI library's one-line name; Open MPI ends the string with a NUL byte, which would
    otherwise go into every run file and report."""
    from mpi4py import MPI

    return MPI.Get_library_version().strip("\x00 \n").splitlines()[0].strip()


def versions() -> dict[str, str]:
    """The versions of the stack this rank trains with (recorded in every run file)."""
    import horovod
    import tensorflow as tf
    import tf_keras

    return {
        "hpcdl": __version__,
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": tf_keras.__version__,
        "horovod": horovod.__version__,
        "mpi": mpi_library(),
    }


def horovod_build() -> dict[str, Any]:
    """What Horovod was built with, asked of Horovod itself (needs no init)."""
    try:
        import horovod
        import horovod.tensorflow as hvd_tf
    except ImportError as exc:
        return {"installed": False, "error": str(exc)}
    return {
        "installed": True,
        "version": horovod.__version__,
        "tensorflow": True,
        "mpi": bool(hvd_tf.mpi_built()),
        "gloo": bool(hvd_tf.gloo_built()),
        "nccl": bool(hvd_tf.nccl_built()),
        "cuda": bool(hvd_tf.cuda_built()),
    }
