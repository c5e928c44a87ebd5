"""hpcdl/report.py and status.py, `hpcdl dashboard`: on a real small sweep and real storages;
the report rendered by headless Chromium; the dashboard queried over HTTP."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import h5py
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import REPO, hpcdl_env, run_hpcdl, write_sweep_config
from hpcdl import config, study

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "results" / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, digits_h5: Path) -> Path:
    """A real sweep: one worker, 4 trials of the smoke config, then aggregate and report."""
    results = tmp_path_factory.mktemp("sweep")
    (results / "data").mkdir()
    shutil.copy(digits_h5, results / "data" / "digits.h5")
    cfg = write_sweep_config(results, search={"n_trials": 4})
    worker = run_hpcdl("worker", "--config", str(cfg), timeout=900)
    assert worker.returncode == 0, worker.stderr[-3000:]
    for verb in ("aggregate", "report"):
        result = run_hpcdl(verb, "--config", str(cfg))
        assert result.returncode == 0, result.stderr[-3000:]
    return cfg


def test_summary_has_one_row_per_trial(sweep: Path) -> None:
    cfg = config.load(sweep)
    table = pd.read_csv(cfg.sweep_dir / "summary.csv")
    assert sorted(table["number"]) == [0, 1, 2, 3]
    assert set(table["state"]) <= {"COMPLETE", "PRUNED"}
    assert (table["file_status"] == "ok").all() and (table["rank_seconds"] > 0).all()
    with h5py.File(cfg.sweep_dir / "summary.h5") as f:
        assert f.attrs["format"] == "hpcdl-summary"
        assert len(f["trials/number"]) == 4 and "val_accuracy" in f["curves/0"]


def test_report_names_the_best_trial_and_embeds_figures(sweep: Path) -> None:
    cfg = config.load(sweep)
    html = (cfg.sweep_dir / "report.html").read_text()
    best_number, best_params = study.best_trial(cfg)
    assert f"trial #{best_number}" in html
    assert f"--set width={best_params['width']}" in html  # the reproduce command
    assert html.count("data:image/png;base64,") >= 4
    for figure in ("history", "importances", "slice", "parallel", "curves", "intermediate"):
        assert (cfg.sweep_dir / "figures" / f"{figure}.png").is_file(), figure
        assert (cfg.sweep_dir / "figures" / f"{figure}.svg").is_file(), figure
    assert "http://" not in html and "https://" not in html  # self-contained


def test_report_renders_in_chromium_without_console_errors(sweep: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by make setup"
    html = config.load(sweep).sweep_dir / "report.html"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    profile = sweep.parent / "chromium-profile"
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--window-size=1200,2400", f"--screenshot={shot}", html.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.stat().st_size > 50_000  # a page with figures, not a blank one
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "error" in line.lower() or "Uncaught" in line], (
        console)


def test_missing_trial_file_is_reported_not_fatal(sweep: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(sweep.parent, copy)
    cfg_path = write_sweep_config(copy, search={"n_trials": 4})
    cfg = config.load(cfg_path)
    cfg.trial_file(1).unlink()
    cfg.trial_file(2).write_text("not hdf5")
    result = run_hpcdl("aggregate", "--config", str(cfg_path))
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(cfg.sweep_dir / "summary.csv").set_index("number")
    assert table.loc[1, "file_status"] == "missing"
    assert table.loc[2, "file_status"].startswith("unreadable")
    assert table.loc[0, "file_status"] == "ok"


def made_up_study(results: Path, states: list[TrialState]) -> Path:
    """A real journal study with trials in the given states (no training needed)."""
    cfg_path = write_sweep_config(results, search={"n_trials": 10})
    cfg = config.load(cfg_path)
    s = study.open_study(cfg)
    for state in states:
        trial = s.ask()
        params = study.suggest(trial, cfg.section("search")["space"])
        assert params
        if state == TrialState.FAIL:
            s._storage.set_trial_system_attr(trial._trial_id, study.FAIL_REASON,
                                             "failed: non-finite loss")
        if state == TrialState.COMPLETE:
            s.tell(trial, 0.5 + 0.01 * trial.number)
        elif state != TrialState.RUNNING:
            trial.report(0.1, 1)
            s.tell(trial, state=state)
    return cfg_path


def test_status_counts_each_state(tmp_path: Path) -> None:
    states = [TrialState.COMPLETE] * 3 + [TrialState.PRUNED] * 2 + [TrialState.FAIL] + [
        TrialState.RUNNING]
    cfg_path = made_up_study(tmp_path, states)
    result = run_hpcdl("status", "--config", str(cfg_path), "--json")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["counts"] == {"COMPLETE": 3, "PRUNED": 2, "FAIL": 1, "RUNNING": 1}
    assert snap["finished"] == 5 and snap["left"] == 4
    assert snap["best"]["number"] == 2 and len(snap["running"]) == 1
    table = run_hpcdl("status", "--config", str(cfg_path), COLUMNS="140")
    assert "5 of 10 trials finished" in table.stdout and "best so far: trial 2" in table.stdout


def test_all_failed_sweep_still_reports(tmp_path: Path) -> None:
    cfg_path = made_up_study(tmp_path, [TrialState.FAIL] * 3)
    result = run_hpcdl("report", "--config", str(cfg_path))
    assert result.returncode == 0, result.stderr[-2000:]
    html = (config.load(cfg_path).sweep_dir / "report.html").read_text()
    assert "No trial completed." in html and "3 failed" in html
    assert "failed: non-finite loss" in html


def test_dashboard_serves_the_study(sweep: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(["hpcdl", "dashboard", "--config", str(sweep), "--port",
                               str(port)], env=hpcdl_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 120, None
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/0",
                                            timeout=5) as response:
                    body = json.load(response)
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        assert body["name"] == "sweep" and len(body["trials"]) == 4
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"ssh -L {port}:localhost:{port}" in out
    s = optuna.load_study(study_name="sweep", storage=study.open_storage(config.load(sweep)))
    assert len(s.trials) == 4


@pytest.mark.mpi
def test_scaling_measures_speedup_and_report_plots_it(sweep: Path) -> None:
    cfg = config.load(sweep)
    (cfg.sweep_dir / "config.yaml").write_text(sweep.read_text())
    result = run_hpcdl("scaling", "--config", str(sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    with h5py.File(cfg.sweep_dir / "scaling.h5") as f:
        assert f["ranks"][()].tolist() == [1, 2]
        assert (f["samples_per_second"][()] > 0).all() and f["efficiency"][0] == 1.0
    assert run_hpcdl("report", "--config", str(sweep)).returncode == 0
    assert (cfg.sweep_dir / "figures" / "scaling.png").is_file()
    assert "Scaling" in (cfg.sweep_dir / "report.html").read_text()


def test_two_objectives_show_the_pareto_front(tmp_path: Path) -> None:
    cfg_path = write_sweep_config(tmp_path, search={
        "n_trials": 6, "pruner": "none",
        "second_objective": {"metric": "n_params", "direction": "minimize"}})
    cfg = config.load(cfg_path)
    s = study.open_study(cfg)
    for i in range(5):
        trial = s.ask()
        study.suggest(trial, cfg.section("search")["space"])
        s.tell(trial, [0.8 + 0.02 * i, 1000.0 * (i % 3 + 1)])
    result = run_hpcdl("report", "--config", str(cfg_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (cfg.sweep_dir / "figures" / "pareto.png").is_file()
    assert "Pareto front" in (cfg.sweep_dir / "report.html").read_text()
