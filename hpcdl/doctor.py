"""`hpcdl doctor`: what the stack has, each item checked against what hpcdl needs."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from hpcdl import __version__, parallel

REBUILD_HOROVOD = (
    "HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 "
    "HOROVOD_WITHOUT_MXNET=1 pip install --no-cache-dir --no-build-isolation --force-reinstall "
    "horovod==0.28.1  (or: make setup)"
)
# The oldest NVIDIA driver that runs code built by each CUDA major (NVIDIA's compatibility table).
MIN_DRIVER = {11: "450.80", 12: "525.60", 13: "580"}
GPU_SETUP = ("make setup-gpu (or make setup on this GPU node: it picks the gpu variant); "
             "in the image: apptainer exec --nv")


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    value: str
    ok: bool
    required: bool
    fix: str = ""


@dataclass(frozen=True)
class GpuFacts:
    """What the GPU verdict depends on: the runtime's build and what the driver and TF see."""

    variant: str  # "cpu" or "gpu" (install.sh's hpcdl-build.json), "unknown" otherwise
    driver_gpus: int  # GPUs `nvidia-smi -L` lists; 0 without a driver
    driver_cuda: str | None  # the newest CUDA the driver supports ("12.4"), from nvidia-smi
    tf_cuda: str | None  # CUDA TensorFlow was built with; None for a CPU build
    tf_cudnn: str | None
    tf_cuda_libs: bool  # the nvidia-* wheels TensorFlow loads CUDA from (the gpu variant's)
    tf_gpus: int  # GPUs TensorFlow can use
    horovod_nccl: bool
    horovod_cuda: str | None  # CUDA of the nvcc that compiled Horovod's kernels


def _major(version: str | None) -> int:
    return int(version.split(".")[0]) if version else 0


def cuda_needed(facts: GpuFacts) -> int:
    """The CUDA major the driver must support: TF's (minor-version compatible within a major)
    or Horovod's kernels', whichever is newer; 0 for a CPU build."""
    return max(_major(facts.tf_cuda), _major(facts.horovod_cuda))


def gpu_checks(facts: GpuFacts) -> list[Check]:
    """The runtime against the node: a GPU the driver sees but TensorFlow or Horovod cannot use
    is an error (a CPU runtime on a GPU node trains on the CPU); no GPU at all is fine."""
    built = (f"CUDA {facts.tf_cuda}, cuDNN {facts.tf_cudnn}" if facts.tf_cuda else "CPU only")
    if facts.tf_cuda and not facts.tf_cuda_libs:
        built += " (its CUDA libraries are not installed)"
    needed = cuda_needed(facts)
    need_text = f"; the build needs CUDA {needed} (driver >= {MIN_DRIVER.get(needed, '?')})"
    driver = (f"{facts.driver_gpus} GPU(s), CUDA {facts.driver_cuda}" if facts.driver_gpus
              else "no GPU visible") + (need_text if needed else "")
    checks = [Check("variant", facts.variant, True, False),
              Check("tensorflow build", built, True, False),
              Check("nvidia driver", driver, True, False)]
    if not facts.driver_gpus:
        return checks
    problems, fix = [], GPU_SETUP
    if facts.variant == "cpu":
        problems.append("this is the cpu runtime")
    if not facts.tf_cuda:
        problems.append("TensorFlow is a CPU build")
    elif not facts.tf_cuda_libs:
        problems.append("TensorFlow's CUDA libraries (nvidia-* wheels) are missing")
    if not facts.horovod_nccl:
        problems.append("Horovod has no NCCL")
    if needed and _major(facts.driver_cuda) < needed:
        problems.append(f"the driver supports CUDA {facts.driver_cuda}, the build needs {needed}")
        fix = (f"a driver >= {MIN_DRIVER.get(needed, '?')}, or Horovod's kernels built by the "
               "driver's CUDA: HPCDL_NVCC=<CUDA 12 toolkit> ./install.sh --variant gpu")
    elif facts.tf_cuda and facts.tf_cuda_libs and not facts.tf_gpus:
        problems.append(f"TensorFlow sees none of the driver's {facts.driver_gpus} GPU(s)")
    verdict = "; ".join(problems) or f"TensorFlow uses {facts.tf_gpus} GPU(s), Horovod has NCCL"
    checks.append(Check("gpu runtime", verdict, not problems, True, fix if problems else ""))
    return checks


def _nvidia_smi() -> tuple[int, str | None]:
    """GPUs the driver lists and the CUDA version it supports; (0, None) without a driver."""
    if not shutil.which("nvidia-smi"):
        return 0, None
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                            check=False).stdout
    header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30,
                            check=False).stdout
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return (sum(line.startswith("GPU ") for line in listed.splitlines()),
            cuda.group(1) if cuda else None)


def build_record() -> dict[str, object]:
    """What install.sh recorded about this runtime (variant, Horovod's nvcc), if it built it."""
    path = Path(sys.prefix) / "hpcdl-build.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def gather_gpu_facts() -> GpuFacts:
    """The facts of this process's runtime and node."""
    import tensorflow as tf

    info = tf.sysconfig.get_build_info()
    record = build_record()
    driver_gpus, driver_cuda = _nvidia_smi()
    return GpuFacts(
        variant=str(record.get("variant", "unknown")), driver_gpus=driver_gpus,
        driver_cuda=driver_cuda,
        tf_cuda=info.get("cuda_version") if info.get("is_cuda_build") else None,
        tf_cudnn=info.get("cudnn_version") if info.get("is_cuda_build") else None,
        tf_cuda_libs=_installed("nvidia-cudnn-cu12") and _installed("nvidia-cuda-runtime-cu12"),
        tf_gpus=len(tf.config.list_physical_devices("GPU")),
        horovod_nccl=bool(parallel.horovod_build().get("nccl")),
        horovod_cuda=record.get("horovod_cuda"))  # type: ignore[arg-type]


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def run_checks() -> list[Check]:
    """Inspect Python, TensorFlow/Keras, Horovod's build, MPI, GPUs, Slurm and Apptainer."""
    checks = [Check("python", platform.python_version(), True, True), *_tensorflow_checks(),
              _horovod_check(), *_mpi_checks()]
    if all(c.ok for c in checks if c.name in ("tensorflow", "keras")):
        checks += gpu_checks(gather_gpu_facts())
    return checks + _tool_checks()


def _tensorflow_checks() -> list[Check]:
    """TensorFlow, Keras 2 (Horovod needs the legacy tf.keras) and the GPUs TensorFlow sees."""
    checks: list[Check] = []
    try:
        import tensorflow as tf

        checks.append(Check("tensorflow", tf.__version__, True, True))
        import tf_keras

        legacy = "tf_keras" in tf.keras.__name__
        checks.append(
            Check(
                "keras",
                f"{tf_keras.__version__} (tf.keras is {tf.keras.__name__})",
                legacy,
                True,
                ""
                if legacy
                else "Horovod needs Keras 2: pip install tf-keras==2.18.0 "
                "and import hpcdl (it sets TF_USE_LEGACY_KERAS=1) before TensorFlow",
            )
        )
        gpus = [gpu.name for gpu in tf.config.list_physical_devices("GPU")]
        checks.append(Check("gpus", ", ".join(gpus) or "none (CPU only)", True, False))
    except ImportError as exc:
        checks.append(Check("tensorflow / tf-keras", f"missing ({exc})", False, True, "make setup"))
    return checks


def _horovod_check() -> Check:
    """Horovod installed and built with a usable controller (MPI or Gloo)."""
    build = parallel.horovod_build()
    if not build["installed"]:
        return Check("horovod", f"missing ({build['error']})", False, True, REBUILD_HOROVOD)
    flags = ", ".join(f"{k}={'yes' if build[k] else 'no'}" for k in ("mpi", "gloo", "nccl"))
    usable = build["mpi"] or build["gloo"]
    return Check("horovod", f"{build['version']} ({flags})", usable, True,
                 "" if usable else REBUILD_HOROVOD)


def _mpi_checks() -> list[Check]:
    """mpi4py, the MPI library it was built against, and mpirun on PATH."""
    checks: list[Check] = []
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # reading the library version needs no MPI_Init
        library = parallel.mpi_library()
        checks.append(Check("mpi4py", mpi4py.__version__, True, True))
        checks.append(Check("mpi library", library, True, True))
    except ImportError as exc:
        checks.append(
            Check(
                "mpi4py",
                f"missing ({exc})",
                False,
                True,
                "apt-get install libopenmpi-dev openmpi-bin; pip install mpi4py",
            )
        )

    mpirun = shutil.which("mpirun")
    checks.append(
        Check(
            "mpirun",
            f"{mpirun}: {_first_line(['mpirun', '--version'])}" if mpirun else "not on PATH",
            bool(mpirun),
            True,
            "" if mpirun else "apt-get install openmpi-bin (or module load openmpi)",
        )
    )
    return checks


def _tool_checks() -> list[Check]:
    """Cluster tools: optional, needed only with Slurm or containers."""
    checks: list[Check] = []
    for tool, fix in (
        ("sbatch", "needed only on a Slurm cluster: module load slurm"),
        ("srun", "needed only on a Slurm cluster: module load slurm"),
        ("apptainer", "needed only for containers: module load apptainer"),
        ("singularity", "needed only for containers"),
    ):
        path = shutil.which(tool)
        checks.append(Check(tool, path or "not on PATH", bool(path), False, "" if path else fix))
    return checks


def all_required_ok(checks: list[Check]) -> bool:
    """Whether hpcdl can run: optional items (Slurm, Apptainer) may be absent."""
    return all(c.ok for c in checks if c.required)


def as_dict(checks: list[Check]) -> dict[str, object]:
    """JSON form: every check, and whether everything required is present."""
    return {"ok": all_required_ok(checks), "checks": [asdict(c) for c in checks]}


def print_report(checks: list[Check]) -> None:
    """The checks as a terminal table, then the fix for each missing required item."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hpcdl {__version__} doctor")
    for column in ("item", "found", "status"):
        table.add_column(column)
    for check in checks:
        status = (
            "[green]ok"
            if check.ok
            else "[red]MISSING"
            if check.required
            else "[yellow]optional, absent"
        )
        table.add_row(check.name, check.value, status)
    console = Console()
    console.print(table)
    for check in checks:
        if not check.ok and check.required:
            console.print(f"[red]{check.name}[/red]: fix with: {check.fix}")
