"""`hpcdl doctor`: reports the real stack, and names the fix when something required is missing."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import hpcdl_env, run_hpcdl
from hpcdl.doctor import GpuFacts, cuda_needed, gpu_checks

GPU_RUNTIME = GpuFacts(variant="gpu", driver_gpus=2, driver_cuda="13.0", tf_cuda="12.5.1",
                       tf_cudnn="9", tf_cuda_libs=True, tf_gpus=2, horovod_nccl=True,
                       horovod_cuda="13.0")
# The cpu variant's TensorFlow is the full wheel: a CUDA build without its CUDA libraries.
CPU_RUNTIME = GpuFacts(variant="cpu", driver_gpus=0, driver_cuda=None, tf_cuda="12.5.1",
                       tf_cudnn="9", tf_cuda_libs=False, tf_gpus=0, horovod_nccl=False,
                       horovod_cuda=None)


def verdict(facts: GpuFacts) -> dict[str, object] | None:
    """The "gpu runtime" check for these facts; None when there is none (no GPU to use)."""
    checks = {c.name: c for c in gpu_checks(facts)}
    return checks["gpu runtime"].__dict__ if "gpu runtime" in checks else None


def test_a_gpu_runtime_on_a_gpu_node_with_a_new_driver_passes() -> None:
    result = verdict(GPU_RUNTIME)
    assert result and result["ok"] and result["required"], result


def test_a_cpu_runtime_on_a_gpu_node_fails_loudly() -> None:
    on_gpu_node = replace(CPU_RUNTIME, driver_gpus=4, driver_cuda="12.4")
    result = verdict(on_gpu_node)
    assert result and not result["ok"] and result["required"]
    assert result["value"] == ("this is the cpu runtime; TensorFlow's CUDA libraries (nvidia-* "
                               "wheels) are missing; Horovod has no NCCL")
    assert "make setup-gpu" in result["fix"]
    tensorflow_cpu = replace(on_gpu_node, variant="unknown", tf_cuda=None, tf_cudnn=None)
    assert verdict(tensorflow_cpu)["value"].startswith("TensorFlow is a CPU build")  # type: ignore[index]


def test_horovod_without_nccl_on_a_gpu_node_fails() -> None:
    result = verdict(replace(GPU_RUNTIME, horovod_nccl=False))
    assert result and not result["ok"] and result["value"] == "Horovod has no NCCL"


def test_runtimes_without_a_gpu_in_sight_pass() -> None:
    """A GPU runtime on a login node, a CPU runtime on a CPU node: nothing to use, nothing wrong."""
    for facts in (replace(GPU_RUNTIME, driver_gpus=0, driver_cuda=None, tf_gpus=0), CPU_RUNTIME):
        assert verdict(facts) is None
        assert all(c.ok for c in gpu_checks(facts))


def test_a_driver_older_than_the_kernels_cuda_fails_with_both_remedies() -> None:
    result = verdict(replace(GPU_RUNTIME, driver_cuda="12.8", tf_gpus=2))
    assert result and not result["ok"]
    assert result["value"] == "the driver supports CUDA 12.8, the build needs 13"
    assert "driver >= 580" in result["fix"] and "HPCDL_NVCC=" in result["fix"]
    cuda12_kernels = replace(GPU_RUNTIME, driver_cuda="12.8", horovod_cuda="12.4")
    assert verdict(cuda12_kernels)["ok"]  # type: ignore[index]


def test_tensorflow_blind_to_the_drivers_gpus_fails() -> None:
    result = verdict(replace(GPU_RUNTIME, tf_gpus=0))
    assert result and not result["ok"]
    assert result["value"] == "TensorFlow sees none of the driver's 2 GPU(s)"


def test_the_cuda_the_driver_must_support() -> None:
    assert cuda_needed(GPU_RUNTIME) == 13
    assert cuda_needed(replace(GPU_RUNTIME, horovod_cuda="12.4")) == 12
    assert cuda_needed(replace(CPU_RUNTIME, tf_cuda=None)) == 0


@pytest.mark.slow
def test_doctor_json_reports_horovod_built_with_mpi_and_gloo() -> None:
    result = run_hpcdl("doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert checks["tensorflow"]["value"] == version("tensorflow") == "2.18.1"
    assert checks["keras"]["value"].startswith(version("tf-keras"))
    assert checks["horovod"]["value"].startswith(version("horovod"))
    assert checks["mpi4py"]["value"] == version("mpi4py")
    mpirun = shutil.which("mpirun")
    assert mpirun and checks["mpirun"]["value"].startswith(f"{mpirun}: mpirun (Open MPI)")
    assert "mpi=yes" in checks["horovod"]["value"] and "gloo=yes" in checks["horovod"]["value"]
    assert checks["mpi library"]["value"].startswith("Open MPI v")
    assert checks["mpi library"]["value"].isprintable()  # Open MPI ends its name with a NUL
    assert checks["gpus"]["required"] is False


@pytest.mark.slow
def test_doctor_names_the_fix_when_mpirun_is_missing() -> None:
    venv_bin = str(Path(sys.executable).parent)
    result = run_hpcdl("doctor", PATH=venv_bin)  # PATH without /usr/bin: no mpirun
    assert result.returncode == 1
    assert "mpirun" in result.stdout and "apt-get install openmpi-bin" in result.stdout


@pytest.mark.slow
def test_doctor_table_is_readable() -> None:
    """The table shows what was found, not only the names: the versions of the installed
    packages, Horovod's MPI build, the mpirun on PATH."""
    result = run_hpcdl("doctor", COLUMNS="200")
    assert result.returncode == 0, result.stderr
    rows = {cells[0]: cells[1:] for cells in (
        [cell.strip() for cell in line.strip("│┃ ").split("│")]
        for line in result.stdout.splitlines() if "│" in line)}
    installed = {name: version(package) for name, package in (
        ("tensorflow", "tensorflow"), ("horovod", "horovod"), ("mpi4py", "mpi4py"))}
    for name, expected in installed.items():
        assert rows[name][0].split()[0] == expected, (name, rows[name])
    assert rows["keras"][0].startswith(f"{version('tf-keras')} (tf.keras is tf_keras")
    assert rows["python"][0] == platform.python_version()
    assert "mpi=yes" in rows["horovod"][0]
    mpirun = shutil.which("mpirun")
    assert mpirun and rows["mpirun"][0].startswith(f"{mpirun}: mpirun (Open MPI)")
    assert rows["sbatch"][0] == (shutil.which("sbatch") or "not on PATH")


# TensorFlow's start-up lines on every process (hpcdl/quiet.py): known and harmless
TF_NOISE = ("All log messages before absl::InitializeLog()", "Unable to register cuDNN factory",
            "Unable to register cuBLAS factory", "Unable to register cuFFT factory")


@pytest.mark.slow
def test_doctor_stderr_has_no_tensorflow_start_up_noise() -> None:
    result = run_hpcdl("doctor")
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines()
                if any(noise in line for noise in TF_NOISE)], result.stderr


@pytest.mark.slow
def test_the_filter_passes_every_other_line_of_fd_2() -> None:
    """Only the known lines go: a real error written at the C level during the import stays."""
    code = ("import os\nfrom hpcdl import quiet\n"
            "with quiet.stderr_without_known_noise():\n"
            "    import tensorflow\n"
            "    os.write(2, b'E0000 00:00:1.2  15652 cuda_dnn.cc:8310] Unable to register cuDNN "
            "factory: Attempting to register factory for plugin cuDNN when one has already been "
            "registered\\n')\n"
            "    os.write(2, b'E0000 real error: libcudnn.so.9 not found\\n')\n"
            "    os.write(2, b'no newline at the end')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=hpcdl_env(), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith("E0000 real error: libcudnn.so.9 not found\n"
                                  "no newline at the end"), result.stderr
    assert not any(noise in result.stderr for noise in TF_NOISE), result.stderr
