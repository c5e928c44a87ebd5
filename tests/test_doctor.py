"""`hpcdl doctor`: reports the real stack, and names the fix when something required is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import run_hpcdl

pytestmark = pytest.mark.slow


def test_doctor_json_reports_horovod_built_with_mpi_and_gloo() -> None:
    result = run_hpcdl("doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert checks["tensorflow"]["value"] == "2.18.1"
    assert checks["keras"]["value"].startswith("2.18")
    assert "mpi=yes" in checks["horovod"]["value"] and "gloo=yes" in checks["horovod"]["value"]
    assert "Open MPI" in checks["mpi library"]["value"]
    assert checks["gpus"]["required"] is False


def test_doctor_names_the_fix_when_mpirun_is_missing() -> None:
    venv_bin = str(Path(sys.executable).parent)
    result = run_hpcdl("doctor", PATH=venv_bin)  # PATH without /usr/bin: no mpirun
    assert result.returncode == 1
    assert "mpirun" in result.stdout and "apt-get install openmpi-bin" in result.stdout


def test_doctor_table_is_readable() -> None:
    result = run_hpcdl("doctor", COLUMNS="160")
    assert result.returncode == 0, result.stderr
    for item in ("tensorflow", "horovod", "mpi4py", "sbatch", "apptainer"):
        assert item in result.stdout
