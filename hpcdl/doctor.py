"""`hpcdl doctor`: what the stack has, each item checked against what hpcdl needs."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass

from hpcdl import __version__, parallel

REBUILD_HOROVOD = (
    "HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 "
    "HOROVOD_WITHOUT_MXNET=1 pip install --no-cache-dir --no-build-isolation --force-reinstall "
    "horovod==0.28.1  (or: make setup)"
)


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    value: str
    ok: bool
    required: bool
    fix: str = ""


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def run_checks() -> list[Check]:
    """Inspect Python, TensorFlow/Keras, Horovod's build, MPI, GPUs, Slurm and Apptainer."""
    return [Check("python", platform.python_version(), True, True), *_tensorflow_checks(),
            _horovod_check(), *_mpi_checks(), *_tool_checks()]


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
