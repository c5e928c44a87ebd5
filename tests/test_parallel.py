"""hpcdl/parallel.py: launch detection, and Horovod over real Open MPI with 2 ranks."""

from __future__ import annotations

import re

import pytest

from conftest import python_cmd, run_mpi
from hpcdl import parallel


def test_detect_launch_mpirun() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "SLURM_JOB_ID": "77",
    }
    launch = parallel.detect_launch(env)
    assert (launch.launcher, launch.rank, launch.size, launch.local_rank, launch.job_id) == (
        "mpirun",
        3,
        4,
        1,
        "77",
    )


def test_detect_launch_srun_array_task() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "PMIX_RANK": "5",
        "SLURM_JOB_ID": "101",
        "SLURM_ARRAY_JOB_ID": "100",
        "SLURM_ARRAY_TASK_ID": "2",
    }
    launch = parallel.detect_launch(env)
    assert (
        launch.launcher,
        launch.rank,
        launch.size,
        launch.local_rank,
        launch.local_size,
        launch.job_id,
    ) == ("srun", 5, 8, 1, 4, "100_2")


def test_detect_launch_batch_script_is_one_rank() -> None:
    # Inside an sbatch script (no srun step) SLURM_NTASKS may be 8, but this process is alone.
    launch = parallel.detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "9"})
    assert (launch.launcher, launch.size) == ("single", 1)


def rank_on(host: str, rank: int, local_rank: int) -> parallel.Ranks:
    return parallel.Ranks(rank, 4, local_rank, 2, "srun", "7", host)


@pytest.mark.parametrize(
    ("env", "detected", "device", "gpu"),
    [
        # --gpus-per-node=2 (or --gres=gpu:2): the rank sees both GPUs of its node
        ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_STEP_GPUS": "0,1"}, 0, 1, "1"),
        # --gpus-per-task=1: Slurm shows local rank 1 its one GPU, the node's GPU 1
        ({"CUDA_VISIBLE_DEVICES": "1", "SLURM_STEP_GPUS": "1"}, 0, 0, "1"),
        # devices constrained by cgroup: renumbered from 0 for CUDA, not in Slurm's list
        ({"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "3"}, 1, 0, "3"),
        # only Slurm's list (batch script, no step): the job's GPUs of this node
        ({"SLURM_JOB_GPUS": "2,3"}, 0, 1, "3"),
        # GPUs TensorFlow found with no list given (a workstation): its numbering is the node's
        ({}, 4, 1, "1"),
        # no GPU at all
        ({}, 0, None, None),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, None, None),
    ],
)
def test_gpu_placement_pins_by_local_rank(env: dict[str, str], detected: int,
                                          device: int | None, gpu: str | None) -> None:
    placement = parallel.gpu_placement(rank_on("n3", 3, 1), env, detected)
    assert (placement.device, placement.gpu) == (device, gpu)
    assert (placement.host, placement.rank, placement.local_rank) == ("n3", 3, 1)
    assert placement.cuda_visible_devices == env.get("CUDA_VISIBLE_DEVICES")
    assert placement.slurm_gpus == (env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"))


def test_placement_conflicts_name_the_ranks_host_and_gpu() -> None:
    all_visible = {"CUDA_VISIBLE_DEVICES": "0,1"}
    one_visible = {"CUDA_VISIBLE_DEVICES": "0"}
    distinct = [parallel.gpu_placement(rank_on(host, 2 * n + local, local), all_visible)
                for n, host in enumerate(("n3", "n4")) for local in (0, 1)]
    assert [(p.host, p.gpu) for p in distinct] == [("n3", "0"), ("n3", "1"), ("n4", "0"),
                                                   ("n4", "1")]
    assert parallel.placement_conflicts(distinct) == []
    # one GPU given to both ranks of n3: local rank 1 wraps round to it too
    shared = [parallel.gpu_placement(rank_on("n3", r, r), one_visible) for r in (0, 1)]
    assert parallel.placement_conflicts(distinct[2:] + shared) == [
        "ranks 0 and 1 on n3 both pin GPU 0"]
    # CPU-only ranks pin nothing: no conflict
    assert parallel.placement_conflicts(
        [parallel.gpu_placement(rank_on("n1", r, r), {}) for r in (0, 1)]) == []


@pytest.mark.parametrize(("rule", "expected"), [("linear", 0.4), ("sqrt", 0.2), ("none", 0.1)])
def test_scaled_learning_rate(rule: str, expected: float) -> None:
    assert parallel.scaled_learning_rate(0.1, 4, rule) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("cores", "local_ranks", "env", "expected"),
    [
        (1, 2, {}, "1"),  # bound to one core
        (2, 2, {}, "1"),  # unbound, 2 ranks share the node's 2 cores
        (1, 2, {"OMPI_MCA_mpi_yield_when_idle": "0"}, "0"),  # the user's setting wins
        (8, 4, {}, None),  # several cores per rank: busy-polling is cheap there
    ],
)
def test_quiet_idle_waits_only_with_a_core_per_rank(
    cores: int, local_ranks: int, env: dict, expected: str | None
) -> None:
    parallel.quiet_idle_waits(env, cores, local_ranks)
    assert env.get("OMPI_MCA_mpi_yield_when_idle") == expected


@pytest.mark.slow
@pytest.mark.mpi
def test_horovod_two_ranks_under_mpirun() -> None:
    code = (
        "from hpcdl import parallel; import numpy as np\n"
        "r = parallel.init()\n"
        "total = parallel.allreduce_sum(np.array([r.rank + 1.0]), 'test.sum')\n"
        "obj = parallel.broadcast_object({'from': r.rank}, 'test.bcast')\n"
        "print(f'RANK {r.rank} OF {r.size} LOCAL {r.local_rank} VIA {r.launcher} "
        'SUM {total[0]:.0f} BCAST {obj["from"]}\', flush=True)\n'
    )
    # Open MPI prints the parameters it took from the environment when MPI starts
    result = run_mpi(2, *python_cmd(code), timeout=300, OMPI_MCA_mpi_show_mca_params="enviro")
    assert result.returncode == 0, result.stdout + result.stderr
    # ranks share one stdout: match the reports wherever the two lines interleave
    reports = sorted(re.findall(r"RANK \d OF \d LOCAL \d VIA \w+ SUM \d BCAST \d", result.stdout))
    assert reports == [f"RANK {r} OF 2 LOCAL {r} VIA mpirun SUM 3 BCAST 0" for r in range(2)]
    # mpirun binds each of 2 ranks to one core, so hpcdl told Open MPI not to busy-poll
    assert "mpi_yield_when_idle=true (environment)" in result.stdout + result.stderr


@pytest.mark.slow
def test_single_process_is_one_rank() -> None:
    import subprocess
    import sys

    from conftest import hpcdl_env

    # Horovod's Keras helpers get tf-keras's backend, and Keras 3 is never loaded
    code = ("import sys, tf_keras; from hpcdl import parallel; r = parallel.init()\n"
            "hvd = parallel.horovod_keras()\n"
            "assert hvd.callbacks.K is tf_keras.backend and 'keras' not in sys.modules\n"
            "print(r.rank, r.size, r.launcher)")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=hpcdl_env(),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1", "single"]
