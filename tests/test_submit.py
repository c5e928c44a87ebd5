"""hpcdl/submit.py: the rendered sbatch scripts against a recorded golden file."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from hpcdl import config, submit

GOLDEN = REPO / "tests" / "data" / "sweep.sbatch.golden"


def rendered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    cfg = config.load(REPO / "configs" / "smoke.yaml", [
        "results_dir=results", "resources.partition=gpu", "resources.account=abc123",
        "resources.nodes=2", "resources.ranks_per_node=4", "resources.gpus_per_node=4",
        "resources.workers=3", "resources.runtime_min=90"])
    scripts = submit.render(cfg, Path("results/smoke/config.yaml"), "/images/hpcdl.sif")
    text = "".join(f"# ---- {s.name}.sbatch\n{s.text}" for s in scripts)
    return text.replace(str(tmp_path), "<WORKDIR>")


def test_scripts_match_the_recorded_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # After a deliberate change, write rendered(...) to GOLDEN, review the diff, commit it.
    assert rendered(tmp_path, monkeypatch) == GOLDEN.read_text()


def test_scripts_carry_the_cluster_contract(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    text = rendered(tmp_path, monkeypatch)
    workers = text.split("# ---- workers.sbatch")[1].split("# ---- report.sbatch")[0]
    for line in ("#SBATCH --array=0-2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu", "#SBATCH --account=abc123", "#SBATCH --time=90",
                 "srun --mpi=pmix --kill-on-bad-exit=1 apptainer exec --nv",
                 "--worker-id $SLURM_ARRAY_TASK_ID", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in workers, line
    sbatch_lines = [ln for ln in workers.splitlines() if ln.startswith("#SBATCH")]
    assert sbatch_lines == sorted(sbatch_lines)


def test_missing_container_is_refused_before_sbatch(tmp_path: Path) -> None:
    cfg = config.load(REPO / "configs" / "smoke.yaml", [f"results_dir={tmp_path}"])
    with pytest.raises(submit.UserError, match=r"resources\.container: /nope\.sif does not exist"):
        submit.submit(cfg, "/nope.sif")
    assert not (tmp_path / "smoke" / "slurm").exists()
