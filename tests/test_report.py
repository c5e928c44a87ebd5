"""hpcdl/report.py and status.py, `hpcdl dashboard`: on a real small sweep and real storages;
the report rendered by headless Chromium; the dashboard queried over HTTP."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import h5py
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import REPO, hpcdl_env, run_hpcdl, start_worker, write_sweep_config
from hpcdl import config, store, study

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
    best = study.best_trial(cfg)
    best_number, best_params = best.number, best.params
    assert f"trial #{best_number}" in html
    assert f"--set width={best_params['width']}" in html  # the reproduce command
    # one CPU-only rank (no GPU given): where it ran, as its run file records it
    placement = store.read_run(cfg.trial_file(best_number)).attrs["placement"]
    assert f"Where its ranks ran (rank host:GPU): 0 {placement[0]['host']}:cpu</p>" in html
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


# the owner a worker records in a trial's system attributes (hpcdl/liveness.py)
RUNNING_OWNER = {"hpcdl:worker_id": 7, "hpcdl:host": "node-042", "hpcdl:pid": os.getpid(),
                 "hpcdl:slurm_job_id": "4242_1", "hpcdl:heartbeat": time.time()}


def made_up_study(results: Path, states: list[TrialState],
                  owner: dict[str, object] = RUNNING_OWNER) -> Path:
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
        if state == TrialState.RUNNING:  # as a worker's rank 0 leaves it, two epochs in
            for key, value in owner.items():
                s._storage.set_trial_system_attr(trial._trial_id, key, value)
            trial.report(0.3, 1)
            trial.report(0.4, 2)
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
    # the best trial's run file, as a 2-node GPU worker writes it
    placement = [{"host": host, "rank": 2 * n + local, "local_rank": local,
                  "cuda_visible_devices": "0,1", "slurm_gpus": "0,1", "device": local,
                  "gpu": str(local)} for n, host in enumerate(("n3", "n4")) for local in (0, 1)]
    store.write_run(config.load(cfg_path).trial_file(2),
                    store.RunRecord({"trial_number": 2, "placement": placement}))
    result = run_hpcdl("status", "--config", str(cfg_path), "--json")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["counts"] == {"COMPLETE": 3, "PRUNED": 2, "FAIL": 1, "RUNNING": 1}
    assert snap["finished"] == 5 and snap["left"] == 4
    assert snap["best"]["number"] == 2 and snap["best"]["placement"] == placement
    [running] = snap["running"]
    assert (running["number"], running["worker"], running["host"], running["job"],
            running["epoch"]) == (6, 7, "node-042", "4242_1", 2)
    table = run_hpcdl("status", "--config", str(cfg_path), COLUMNS="140")
    assert "5 of 10 trials finished" in table.stdout and "best so far: trial 2" in table.stdout
    assert "0 n3:GPU 0, 1 n3:GPU 1, 2 n4:GPU 0, 3 n4:GPU 1" in table.stdout
    row = next(line for line in table.stdout.splitlines() if "node-042" in line)
    assert [cell.strip() for cell in row.split("│")[1:6]] == ["6", "7", "node-042", "4242_1", "2"]


def test_status_of_a_local_worker_shows_no_none(tmp_path: Path) -> None:
    """A worker started outside Slurm (make demo) records no job id: the table says 'local'."""
    local_owner = {k: v for k, v in RUNNING_OWNER.items() if k != "hpcdl:slurm_job_id"}
    cfg_path = made_up_study(tmp_path, [TrialState.RUNNING], owner=local_owner)
    table = run_hpcdl("status", "--config", str(cfg_path), COLUMNS="140")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if "node-042" in line)
    assert [cell.strip() for cell in row.split("│")[1:6]] == ["0", "7", "node-042", "local", "2"]
    assert "None" not in table.stdout, table.stdout


def as_a_terminals_foreground_job() -> None:
    """Ctrl-C reaches a terminal's foreground job with SIGINT at its default. A suite started
    as a shell's background job runs with SIGINT ignored, which its children inherit: two CI
    runs started that way failed both Ctrl-C tests (`hpcdl status` never saw the signal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_status_watch_refreshes_until_interrupted(tmp_path: Path) -> None:
    cfg_path = made_up_study(tmp_path, [TrialState.COMPLETE, TrialState.RUNNING])
    leader, follower = pty.openpty()
    watch = subprocess.Popen(["hpcdl", "status", "--config", str(cfg_path), "--watch",
                              "--every", "0.5"], env=hpcdl_env(COLUMNS="120", LINES="40"),
                             stdin=follower, stdout=follower, stderr=follower, close_fds=True,
                             preexec_fn=as_a_terminals_foreground_job)
    os.close(follower)
    screen, deadline = b"", time.monotonic() + 120
    while screen.count(b"trials finished") < 3 and time.monotonic() < deadline:
        if select.select([leader], [], [], 1)[0]:
            screen += os.read(leader, 65536)
    watch.send_signal(signal.SIGINT)  # Ctrl-C
    assert watch.wait(timeout=60) == 0
    while select.select([leader], [], [], 0.5)[0]:
        try:
            screen += os.read(leader, 65536)
        except OSError:  # the pty closes with its last writer
            break
    os.close(leader)
    text = screen.decode(errors="replace")
    assert text.count("1 of 10 trials finished") >= 3, text[-2000:]  # redrawn, not printed once
    assert "node-042" in text and "Traceback" not in text, text[-2000:]


def read_pty_until_exit(leader: int, process: subprocess.Popen[bytes],
                        timeout: float) -> bytes:
    """Everything `process` writes to its pseudo-terminal until it exits."""
    screen, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 1)[0]:
            try:
                screen += os.read(leader, 65536)
            except OSError:  # the pty closes with its last writer
                break
        elif process.poll() is not None:
            break
    return screen


@pytest.mark.mpi
def test_follow_redraws_one_line_while_a_real_worker_runs_and_ends_with_it(
        results: Path) -> None:
    cfg_path = write_sweep_config(results, search={"n_trials": 3}, train={"epochs": 2})
    leader, follower = pty.openpty()
    follow = subprocess.Popen(["hpcdl", "status", "--config", str(cfg_path), "--follow",
                               "--every", "1"], env=hpcdl_env(COLUMNS="160"),
                              stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    worker = start_worker(cfg_path, 0, log=results / "worker.log")
    try:
        screen = read_pty_until_exit(leader, follow, timeout=600)
    finally:
        os.close(leader)
        follow.kill()
        worker.wait(timeout=600)
    assert follow.wait(timeout=60) == 0 and worker.returncode == 0
    text = screen.decode(errors="replace")
    draws = text.split("\r\x1b[K")[1:]  # each redraw of the one line, in place
    assert any("waiting for the first worker" in d for d in draws), text[-2000:]
    assert any("0/3 trials finished" in d and "1 running" in d for d in draws), text[-2000:]
    assert any("ETA" in d for d in draws), text[-2000:]
    assert "3/3 trials finished" in draws[-1] and "0 running" in draws[-1], text[-2000:]
    assert "best val_accuracy" in draws[-1]
    assert not [d for d in draws if "\n" in d.rstrip("\r\n")], text[-2000:]  # one line


def test_follow_ends_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    cfg_path = made_up_study(tmp_path, [TrialState.RUNNING])  # a sweep that never ends
    leader, follower = pty.openpty()
    follow = subprocess.Popen(["hpcdl", "status", "--config", str(cfg_path), "--follow",
                               "--every", "1"], env=hpcdl_env(COLUMNS="160"),
                              stdin=follower, stdout=follower, stderr=follower, close_fds=True,
                              preexec_fn=as_a_terminals_foreground_job)
    os.close(follower)
    screen, deadline = b"", time.monotonic() + 120
    while screen.count(b"1 running") < 2 and time.monotonic() < deadline:
        if select.select([leader], [], [], 1)[0]:
            screen += os.read(leader, 65536)
    follow.send_signal(signal.SIGINT)
    screen += read_pty_until_exit(leader, follow, timeout=60)
    os.close(leader)
    assert follow.wait(timeout=60) == 0, screen.decode(errors="replace")
    assert b"Traceback" not in screen and screen.count(b"1 running") >= 2


def test_follow_in_a_log_passes_piped_lines_and_prints_plain_lines(tmp_path: Path) -> None:
    """CI's log: Snakemake's lines unchanged and in order, the progress as plain lines, no
    control sequences; ends when the piped output does."""
    cfg_path = made_up_study(tmp_path, [TrialState.COMPLETE] * 2 + [TrialState.PRUNED])
    snakemake_like = subprocess.Popen(
        ["sh", "-c", "echo 'Building DAG of jobs...'; sleep 3; echo 'rule worker:'; "
         "printf 'Finished job 3.'"], stdout=subprocess.PIPE)
    follow = subprocess.run(["hpcdl", "status", "--config", str(cfg_path), "--follow",
                             "--every", "1"], env=hpcdl_env(), stdin=snakemake_like.stdout,
                            capture_output=True, text=True, timeout=300, check=False)
    assert snakemake_like.wait(timeout=60) == 0
    assert follow.returncode == 0, follow.stderr
    lines = follow.stdout.splitlines()
    assert [ln for ln in lines if not ln.startswith("sweep ")] == [
        "Building DAG of jobs...", "rule worker:", "Finished job 3."], follow.stdout
    progress = [ln for ln in lines if ln.startswith("sweep ")]
    assert progress and "3/10 trials finished (1 pruned, 0 failed)" in progress[0], progress
    assert "best val_accuracy 0.5100 (trial 1)" in progress[0]
    assert "\x1b" not in follow.stdout and "\r" not in follow.stdout


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
        table = {name: f[name][()].tolist() for name in
                 ("ranks", "samples_per_second", "speedup", "efficiency")}
    assert table["ranks"] == [1, 2]
    runs = {r: store.read_run(cfg.paths.scaling_run(r)) for r in (1, 2)}
    batch = cfg.params["batch_size"]
    for ranks, run in runs.items():
        # per-rank batch fixed: the global batch grows with the ranks
        assert run.attrs["ranks"] == ranks and run.attrs["global_batch_size"] == ranks * batch
        assert run.n_epochs == cfg.section("resources")["scaling_epochs"] == 3
    # epoch 1 (graph tracing) is not timed: samples/s is the median of epochs 2.. only
    timed = {r: statistics.median(run.epochs["samples_per_second"][1:])
             for r, run in runs.items()}
    assert table["samples_per_second"] == pytest.approx([timed[1], timed[2]], rel=1e-12)
    speedup = timed[2] / timed[1]
    assert table["speedup"] == pytest.approx([1.0, speedup], rel=1e-12)
    assert table["efficiency"] == pytest.approx([1.0, speedup / 2], rel=1e-12)
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


class Page(HTMLParser):
    """The report's text as a reader sees it: every table's rows (cell texts) under the
    heading before it, and the cards (label, bold value)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.cards: list[tuple[str, str]] = []
        self._heading = self._text = self._card_label = ""
        self._in: list[str] = []
        self._row: list[str] | None = None
        self._card: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h2", "h3", "td", "th", "b"):
            self._text = ""
        if tag == "table":
            self.tables[self._heading] = []
        elif tag == "tr":
            self._row = []
        elif tag == "div" and ("class", "card") in attrs:
            self._card, self._card_label = [], ""
        self._in.append(tag)

    def handle_endtag(self, tag: str) -> None:
        text = " ".join(self._text.split())
        if tag in ("h2", "h3"):
            self._heading = text
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(text)
        elif tag == "tr" and self._row is not None:
            self.tables[self._heading].append(self._row)
            self._row = None
        elif tag == "b" and self._card is not None:
            self._card.append(text)
        elif tag == "div" and self._card is not None:
            self.cards.append((self._card_label, self._card[0]))
            self._card = None
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        if self._card is not None and not self._card_label:  # the text before <b>
            self._card_label = " ".join(data.split())
        self._text += data


def test_report_shows_the_final_retrain_and_provenance(sweep: Path) -> None:
    cfg = config.load(sweep)
    # one epoch: a final model whose test accuracy differs from the best trial's own
    final = run_hpcdl("final", "--config", str(sweep), "--set", "epochs=1")
    assert final.returncode == 0, final.stderr[-3000:]
    assert run_hpcdl("report", "--config", str(sweep)).returncode == 0
    page = Page((cfg.sweep_dir / "report.html").read_text())
    retrained = store.read_run(cfg.paths.best_run)
    cards = dict(page.cards)
    assert cards["final retrain (train+val)"] == f"{retrained.test['accuracy']:.4g}"
    assert cards["test accuracy"] != cards["final retrain (train+val)"]  # told apart
    versions = {name: value for name, value in page.tables["Provenance"]}
    assert versions == store.read_run(cfg.trial_file(0)).attrs["versions"]
    assert versions == retrained.attrs["versions"]
    assert set(versions) >= {"hpcdl", "python", "tensorflow", "keras", "horovod", "mpi"}


class DevTools:
    """Headless Chromium driven over its DevTools protocol on a pipe (--remote-debugging-pipe:
    it reads commands on fd 3 and answers on fd 4, NUL-terminated JSON): no driver package."""

    def __init__(self, profile: Path) -> None:
        to_chromium, self._commands = os.pipe()
        self._answers, from_chromium = os.pipe()
        # out of the way of 3 and 4, where the child must find them
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chromium, from_chromium)]
        for fd in (to_chromium, from_chromium):
            os.close(fd)

        def wire() -> None:
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        self.process = subprocess.Popen(
            [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1200,2400", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self._buffer, self._next_id, self.session = b"", 0, None

    def call(self, method: str, **params: object) -> dict:
        """Send one command (to the attached page, once there is one) and wait for its answer."""
        self._next_id += 1
        message: dict[str, object] = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    assert "error" not in answer, answer
                    return answer["result"]
            if select.select([self._answers], [], [], 1)[0]:
                self._buffer += os.read(self._answers, 1 << 20)
        raise TimeoutError(f"Chromium did not answer {method}")

    def evaluate(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"]["value"]

    def close(self) -> None:
        """Ask the browser to quit; kill it if it does not."""
        self.session = None
        try:
            self.call("Browser.close")
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            os.close(self._commands)
            os.close(self._answers)


def test_clicking_a_header_sorts_the_trials_table_in_chromium(sweep: Path) -> None:
    html = config.load(sweep).sweep_dir / "report.html"
    rows = Page(html.read_text()).tables["Top trials"]
    header, body = rows[0], rows[1:]
    width_of = {int(r[0]): float(r[header.index("width")]) for r in body}
    browser = DevTools(sweep.parent / "chromium-devtools")
    try:
        target = browser.call("Target.createTarget", url=html.as_uri())["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target,
                                       flatten=True)["sessionId"]
        deadline = time.monotonic() + 60
        loaded = f"location.href === {json.dumps(html.as_uri())} && document.readyState"
        while browser.evaluate(loaded) != "complete":  # not the blank page before it
            assert time.monotonic() < deadline, "the report did not load"
            time.sleep(0.2)
        order = ("[...document.querySelectorAll('#trials tbody tr')]"
                 ".map(r => +r.cells[0].textContent)")

        def click(column: str) -> list[int]:
            """A real mouse click (press, release) in the middle of the header cell."""
            x, y = browser.evaluate(
                f"(() => {{ const th = [...document.querySelectorAll('#trials th')].find("
                f"t => t.textContent.trim() === {json.dumps(column)}); th.scrollIntoView();"
                f" const r = th.getBoundingClientRect(); return [r.x + r.width / 2,"
                f" r.y + r.height / 2]; }})()")
            for kind in ("mousePressed", "mouseReleased"):
                browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                             clickCount=1)
            return browser.evaluate(order)

        assert browser.evaluate(order) == [0, 1, 2, 3]
        assert click("#") == [3, 2, 1, 0]  # first click: descending
        assert click("#") == [0, 1, 2, 3]  # second: ascending
        # ties keep the order they had (the sort is stable)
        assert click("width") == sorted(width_of, key=lambda n: -width_of[n])
        assert click("width") == sorted(width_of, key=lambda n: width_of[n])
    finally:
        browser.close()


def test_reproduce_command_of_a_rerun_uses_the_seed_it_trained_with(tmp_path: Path) -> None:
    """A trial re-run after an interruption trains with its first attempt's seed (it resumes that
    run); the report's reproduce command must give that seed, not one of its own number."""
    from hpcdl import report

    cfg = config.load(write_sweep_config(tmp_path, search={"n_trials": 3}))
    s = study.open_study(cfg)
    first = s.ask()
    study.suggest(first, cfg.section("search")["space"])
    assert study.fail_and_retry(s, first, "interrupted (SIGTERM/SIGUSR1): test")
    rerun = s.ask()
    s.tell(rerun, 0.9)
    frozen = s.get_trials()[rerun.number]
    assert frozen.system_attrs["failed_trial"] == first.number
    command = report.reproduce_command(cfg, report.trial_row(cfg, frozen))
    assert f"--set seed={study.trial_seed(0, first.number)} " in command
    assert f"--set seed={study.trial_seed(0, rerun.number)} " not in command
