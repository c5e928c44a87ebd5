"""hpcdl/submit.py: the rendered sbatch scripts against a recorded golden file, and
`hpcdl submit --dry-run` / `--apptainer` as a user runs them (no cluster needed)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from conftest import REPO, run_hpcdl, write_sweep_config
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
    # %a is the array index; Slurm writes 4294967294 for it in a job that is not an array
    outputs = [ln for ln in text.splitlines() if ln.startswith("#SBATCH --output=")]
    assert outputs == ["#SBATCH --output=results/smoke/logs/slurm-prepare-%j.out",
                       "#SBATCH --output=results/smoke/logs/slurm-workers-%A_%a.out",
                       "#SBATCH --output=results/smoke/logs/slurm-report-%j.out"]


def test_missing_container_is_refused_before_sbatch(tmp_path: Path) -> None:
    cfg = write_sweep_config(tmp_path, resources={"container": "/nope.sif"})
    result = run_hpcdl("submit", "--config", str(cfg), "--apptainer", timeout=120)
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        f"hpcdl submit: error: {cfg}: resources.container: /nope.sif does not exist (build it "
        "with: apptainer build hpcdl.sif containers/hpcdl.def)"])
    assert not (tmp_path / "sweep" / "slurm").exists()


def dry_run(tmp_path: Path, *flags: str, **resources: object) -> tuple[str, Path]:
    """`hpcdl submit --dry-run` on a smoke sweep under tmp_path; its stdout and sweep dir."""
    cfg = write_sweep_config(tmp_path, name="dry", resources={"workers": 2, **resources})
    result = run_hpcdl("submit", "--config", str(cfg), "--dry-run", *flags, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout, tmp_path / "dry"


def script_commands(stdout: str) -> dict[str, list[str]]:
    """Each printed script's name -> its `hpcdl ...` command lines (srun prefix kept)."""
    scripts = {}
    for chunk in stdout.split("# ---- ")[1:]:
        header, body = chunk.split("\n", 1)
        scripts[Path(header).stem] = [ln for ln in body.splitlines() if " hpcdl " in f" {ln}"]
    return scripts


def sbatch_commands(stdout: str) -> list[str]:
    """The sbatch command lines a dry run prints after the scripts."""
    return stdout.split("in submission order (job ids as placeholders):\n")[1].splitlines()


def test_dry_run_prints_the_three_scripts_and_submits_nothing(tmp_path: Path) -> None:
    stdout, sweep_dir = dry_run(tmp_path)
    # named by the paths `hpcdl submit` would write them to, in submission order
    assert [ln for ln in stdout.splitlines() if ln.startswith("# ---- ")] == [
        f"# ---- {sweep_dir / 'slurm' / name}.sbatch" for name in ("prepare", "workers", "report")]
    commands = script_commands(stdout)
    cfg = shlex.quote(str(sweep_dir / "config.yaml"))
    assert commands == {
        "prepare": [f"hpcdl prepare --config {cfg} --force"],
        "workers": ["srun --mpi=pmix --kill-on-bad-exit=1 hpcdl worker --config "
                    f"{cfg} --worker-id $SLURM_ARRAY_TASK_ID &"],
        "report": [f"srun --mpi=pmix --kill-on-bad-exit=1 hpcdl final --config {cfg}",
                   f"hpcdl aggregate --config {cfg}", f"hpcdl report --config {cfg}"]}
    assert "#SBATCH --array=0-1" in stdout and "apptainer" not in stdout
    # then the sbatch calls `hpcdl submit` would make, chained by the placeholders' job ids
    slurm = sweep_dir / "slurm"
    assert sbatch_commands(stdout) == [
        f"sbatch --parsable {slurm}/prepare.sbatch",
        f"sbatch --parsable --dependency=afterok:<prepare id> {slurm}/workers.sbatch",
        f"sbatch --parsable --dependency=afterany:<workers id> {slurm}/report.sbatch"]
    # nothing written (no scripts, no config copy, no log dir), so nothing could be submitted
    assert not sweep_dir.exists()


def test_dry_run_with_the_dataset_file_present_submits_no_prepare(tmp_path: Path,
                                                                  digits_h5: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits.h5").symlink_to(digits_h5)
    stdout, sweep_dir = dry_run(tmp_path)
    assert sbatch_commands(stdout) == [
        f"sbatch --parsable {sweep_dir}/slurm/workers.sbatch",
        f"sbatch --parsable --dependency=afterany:<workers id> {sweep_dir}/slurm/report.sbatch"]


def test_apptainer_wraps_every_step_in_the_image(tmp_path: Path) -> None:
    image = tmp_path / "hpcdl.sif"
    image.write_bytes(b"")
    stdout, sweep_dir = dry_run(tmp_path, "--apptainer", container=str(image))
    wrap = f"apptainer exec --nv --bind {shlex.quote(str(Path.cwd()))} {image} hpcdl "
    commands = script_commands(stdout)
    assert sorted(commands) == ["prepare", "report", "workers"]
    lines = [ln.removeprefix("srun --mpi=pmix --kill-on-bad-exit=1 ")
             for found in commands.values() for ln in found]
    for line in lines:  # srun starts the image on every rank (the hybrid model), not inside it
        assert line.startswith(wrap), line
    assert [ln.removeprefix(wrap).split()[0] for ln in lines] == [
        "prepare", "worker", "final", "aggregate", "report"]
    assert not sweep_dir.exists()
