"""`hpcdl status`: the sweep right now, as a terminal table (rich), JSON, or a live view;
`hpcdl dashboard`: the same study in optuna-dashboard."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from collections import Counter
from typing import Any, BinaryIO, TextIO

from optuna.trial import TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from hpcdl import liveness, store, study
from hpcdl.config import Config


def snapshot(config: Config) -> dict[str, Any]:
    """Counts by state, running trials with owner and epoch, the best so far, budget left."""
    s = study.load_study(config)
    trials = s.get_trials(deepcopy=False)
    search = config.section("search")
    replaced = study.replaced_numbers(trials)
    counts = Counter(t.state.name for t in trials)
    running = [{"number": t.number, "worker": t.system_attrs.get(liveness.WORKER),
                "host": t.system_attrs.get(liveness.HOST),
                "job": t.system_attrs.get(liveness.JOB),
                "epoch": max(t.intermediate_values, default=0), "params": t.params}
               for t in trials if t.state == TrialState.RUNNING]
    best = study.best_complete(config, trials)
    spent = study.budget(trials, search["count_failed"], replaced)
    return {
        "name": config.name, "counts": dict(counts), "running": running,
        "retried": len(replaced), "finished": spent.finished, "n_trials": search["n_trials"],
        "left": max(0, search["n_trials"] - spent.claimed),
        "best": {"number": best.number, "value": best.values[0], "params": best.params,
                 "placement": _placement(config, best.number)}
        if best else None, "metric": search["metric"],
    }


def _placement(config: Config, number: int) -> list[dict[str, Any]] | None:
    """Where each rank of a trial ran (its run file's `placement`); None if not recorded."""
    path = config.trial_file(number)
    return store.read_run(path).attrs.get("placement") if path.exists() else None


def render(snap: dict[str, Any]) -> Group:
    """The snapshot as tables: counts by state, the running trials, the best so far."""
    summary = Table(title=f"sweep {snap['name']}: {snap['finished']} of {snap['n_trials']} "
                    f"trials finished, {snap['left']} left to start")
    for state in ("COMPLETE", "RUNNING", "PRUNED", "FAIL", "WAITING"):
        summary.add_column(state.lower(), justify="right")
    summary.add_row(*(str(snap["counts"].get(s, 0)) for s in
                      ("COMPLETE", "RUNNING", "PRUNED", "FAIL", "WAITING")))
    parts: list[Any] = [summary]
    if snap["running"]:
        running = Table(title="running")
        for column in ("trial", "worker", "host", "slurm job", "epoch", "params"):
            running.add_column(column)
        for r in snap["running"]:
            # workers started outside Slurm (make demo, mpirun) have no job id
            running.add_row(str(r["number"]), str(r["worker"]), str(r["host"]),
                            str(r["job"] or "local"),
                            str(r["epoch"]), ", ".join(f"{k}={v:.3g}" if isinstance(v, float)
                                                        else f"{k}={v}"
                                                        for k, v in r["params"].items()))
        parts.append(running)
    best = snap["best"]
    if best:
        best_table = Table(title=f"best so far: trial {best['number']}, {snap['metric']} "
                           f"{best['value']:.4f}")
        best_table.add_column("parameter")
        best_table.add_column("value")
        for key, value in best["params"].items():
            best_table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        if best["placement"]:
            best_table.add_row("placement (rank host:GPU)", store.placement_text(best["placement"]))
        parts.append(best_table)
    return Group(*parts)


def as_json(config: Config) -> str:
    """The snapshot for scripts."""
    return json.dumps(snapshot(config), indent=2, default=str)


def show(config: Config) -> None:
    """Print the tables once."""
    Console().print(render(snapshot(config)))


def watch(config: Config, every: float) -> None:
    """Redraw the tables every `every` seconds until Ctrl-C."""
    with Live(render(snapshot(config)), refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(every)
                live.update(render(snapshot(config)))
        except KeyboardInterrupt:  # Ctrl-C is how a watch ends, not an error
            return


# ------------------------------------------------------------- one live line (make demo)

# A plain (non-terminal) log gets a line when the counts change, else this often.
PLAIN_EVERY_S = 60.0


def progress_line(config: Config) -> tuple[str, bool]:
    """One line on the sweep (finished / pruned / running, best, ETA) and whether it is over."""
    if config.storage_url == "journal" and not config.paths.journal.exists():
        return f"sweep {config.name}: waiting for the first worker", False
    try:
        s = study.load_study(config)
    except KeyError:  # Optuna's "study not found": no worker has created it yet
        return f"sweep {config.name}: waiting for the first worker", False
    trials = s.get_trials(deepcopy=False)
    search = config.section("search")
    spent = study.budget(trials, search["count_failed"])
    counts = Counter(t.state for t in trials)
    running = counts[TrialState.RUNNING]
    best = study.best_complete(config, trials)
    parts = [f"sweep {config.name}: {spent.finished}/{search['n_trials']} trials finished "
             f"({counts[TrialState.PRUNED]} pruned, {spent.failed} failed), {running} running",
             f"best {search['metric']} {best.values[0]:.4f} (trial {best.number})" if best
             else "no complete trial yet"]
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    left = search["n_trials"] - spent.finished
    if starts and spent.finished and left > 0:
        per_trial = (time.time() - min(starts)) / spent.finished
        parts.append(f"ETA {_minutes(per_trial * left)}")
    over = study.budget_left(s, config) is not None and not running
    return ", ".join(parts), over


def _minutes(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLine:
    """The live line on a terminal (redrawn in place, other text printed above it), or
    occasional plain lines in a log."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.terminal = out.isatty()
        self.shown = ""  # on a terminal: the line now on screen; in a log: the last one printed
        self.printed_at = 0.0

    def update(self, line: str) -> None:
        if self.terminal:
            self.out.write(f"\r\x1b[K{line}")
            self.shown = line
        elif _without_eta(line) != _without_eta(self.shown) or (
                time.monotonic() - self.printed_at >= PLAIN_EVERY_S):
            self.out.write(f"{line}\n")
            self.shown, self.printed_at = line, time.monotonic()
        self.out.flush()

    def print_above(self, text: str) -> None:
        """Text of another program (Snakemake's job lines), kept intact above the live line."""
        if self.terminal and self.shown:
            self.out.write(f"\r\x1b[K{text}{self.shown}")
        else:
            self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        if self.terminal and self.shown:
            self.out.write("\n")
            self.out.flush()


def _without_eta(line: str) -> str:
    return line.partition(", ETA ")[0]


def follow(config: Config, every: float, passthrough: BinaryIO | None) -> None:
    """The live line until the sweep is over or Ctrl-C. With `passthrough` (Snakemake's output
    piped in, as `make demo` does), its lines are printed above the live line and the follow
    ends when it closes: after Ctrl-C the line stops but Snakemake's last words still pass."""
    line = ProgressLine(sys.stdout)
    drawing, pending = True, b""
    next_read = 0.0
    try:
        while True:
            try:
                if drawing and time.monotonic() >= next_read:
                    text, over = _progress_or_reason(config)
                    line.update(text)
                    next_read = time.monotonic() + every
                    if over:
                        if passthrough is None:
                            return
                        drawing = False  # the line stays; Snakemake goes on to the report
                wait = max(0.0, next_read - time.monotonic()) if drawing else None
                if passthrough is None:
                    time.sleep(wait or 0)
                    continue
                if not select.select([passthrough], [], [], wait)[0]:
                    continue
                chunk = os.read(passthrough.fileno(), 65536)
                if not chunk:
                    if pending:
                        line.print_above(pending.decode(errors="replace") + "\n")
                    return
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    line.print_above("".join(c.decode(errors="replace") + "\n"
                                             for c in complete))
            except KeyboardInterrupt:  # Ctrl-C ends the watch; Snakemake ends on its own
                if passthrough is None or not drawing:
                    return
                drawing = False
    finally:
        line.close()


def _progress_or_reason(config: Config) -> tuple[str, bool]:
    """progress_line, or why the study could not be read this time (the next read may)."""
    try:
        return progress_line(config)
    except Exception as exc:  # a storage being written may fail a read: not worth ending for
        return f"sweep {config.name}: status unavailable ({str(exc).splitlines()[0]})", False


def dashboard(config: Config, host: str, port: int) -> None:
    """Serve optuna-dashboard on the sweep's study until stopped; say how to reach it."""
    import optuna_dashboard

    print(f"optuna-dashboard for sweep {config.name} ({config.storage_url}) at "
          f"http://{host}:{port}/\nfrom your laptop: ssh -L {port}:localhost:"
          f"{port} {socket.gethostname()}  then open http://localhost:{port}/",
          flush=True)
    optuna_dashboard.run_server(study.open_storage(config), host=host, port=port)
