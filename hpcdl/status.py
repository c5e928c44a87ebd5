"""`hpcdl status`: the sweep right now, as a terminal table (rich), JSON, or a live view;
`hpcdl dashboard`: the same study in optuna-dashboard."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from typing import Any

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
            running.add_row(str(r["number"]), str(r["worker"]), str(r["host"]), str(r["job"]),
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


def dashboard(config: Config, host: str, port: int) -> None:
    """Serve optuna-dashboard on the sweep's study until stopped; say how to reach it."""
    import optuna_dashboard

    print(f"optuna-dashboard for sweep {config.name} ({config.storage_url}) at "
          f"http://{host}:{port}/\nfrom your laptop: ssh -L {port}:localhost:"
          f"{port} {socket.gethostname()}  then open http://localhost:{port}/",
          flush=True)
    optuna_dashboard.run_server(study.open_storage(config), host=host, port=port)
