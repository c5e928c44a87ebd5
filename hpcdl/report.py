"""Aggregate a sweep into summary.h5/.csv, and render report.html (+ PNG figures beside it).

The report answers: what is the best model, how sure are we, what mattered, what did it cost.
Figures come from Optuna's visualisation module (matplotlib backend, so PNGs need no browser),
embedded in the HTML as data URIs: one self-contained file to mail to the group.
"""

from __future__ import annotations

import base64
import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from hpcdl import __version__, store, study
from hpcdl.config import Config

log = logging.getLogger("hpcdl.report")

SUMMARY_FORMAT = "hpcdl-summary"


@dataclass
class TrialRow:
    """One trial as the summary and report see it: the study's view joined with its run file."""

    number: int
    state: str
    params: dict[str, Any]
    values: list[float] | None
    best_epoch: int | None
    epochs_run: int
    wall_seconds: float
    ranks: int
    stop_reason: str
    fail_reason: str
    file_status: str
    samples_per_second: float
    n_params: int | None
    test_accuracy: float | None
    curves: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rank_seconds(self) -> float:
        return self.wall_seconds * self.ranks


def trial_row(config: Config, trial: FrozenTrial) -> TrialRow:
    """Join a trial with its run file; a missing or unreadable file is noted, not fatal."""
    path = config.trial_file(trial.number)
    run: store.RunRecord | None = None
    if not path.exists():
        status = "missing"
    else:
        try:
            run = store.read_run(path)
            status = "ok"
        except (OSError, ValueError) as exc:
            status = f"unreadable: {exc}"
    metric = config.section("search")["metric"]
    curve = run.epochs.get(metric, []) if run else []
    best_epoch = None
    if curve:
        better = study.objective_sign(config) * np.asarray(curve)  # the best epoch is the max
        best_epoch = int(np.nanargmax(better)) + 1 if not np.all(np.isnan(curve)) else None
    speeds = run.epochs.get("samples_per_second", [])[1:] if run else []  # epoch 1 traces
    return TrialRow(
        number=trial.number,
        state=trial.state.name,
        params=dict(trial.params),
        values=list(trial.values) if trial.values else None,
        best_epoch=best_epoch,
        epochs_run=run.n_epochs if run else 0,
        wall_seconds=float(run.attrs.get("wall_seconds", 0.0)) if run else 0.0,
        ranks=int(run.attrs.get("ranks", 0)) if run else 0,
        stop_reason=str(run.attrs.get("stop_reason", "")) if run else "",
        fail_reason=str(trial.system_attrs.get(study.FAIL_REASON, "")),
        file_status=status,
        samples_per_second=float(np.median(speeds)) if len(speeds) else math.nan,
        n_params=int(run.attrs["n_params"]) if run and "n_params" in run.attrs else None,
        test_accuracy=run.test.get("accuracy") if run else None,
        curves=run.epochs if run else {},
    )


def collect(config: Config) -> tuple[optuna.Study, list[TrialRow]]:
    s = study.load_study(config)
    return s, [trial_row(config, t) for t in s.get_trials(deepcopy=False)]


def write_summary(config: Config, rows: list[TrialRow]) -> tuple[Path, Path]:
    """summary.h5 (one row per trial plus every trial's curves) and summary.csv."""
    import pandas as pd

    names = sorted({name for row in rows for name in row.params})
    table = pd.DataFrame(
        [
            {
                "number": r.number,
                "state": r.state,
                **{f"param_{n}": r.params.get(n) for n in names},
                "value": r.values[0] if r.values else None,
                "value_2": r.values[1] if r.values and len(r.values) > 1 else None,
                "best_epoch": r.best_epoch,
                "epochs_run": r.epochs_run,
                "wall_seconds": r.wall_seconds,
                "rank_seconds": r.rank_seconds,
                "ranks": r.ranks,
                "samples_per_second": r.samples_per_second,
                "n_params": r.n_params,
                "test_accuracy": r.test_accuracy,
                "stop_reason": r.stop_reason,
                "fail_reason": r.fail_reason,
                "file_status": r.file_status,
            }
            for r in rows
        ]
    )
    csv_path, h5_path = config.paths.summary_csv, config.paths.summary_h5
    with store.atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with store.atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs.update(
            {
                "format": SUMMARY_FORMAT,
                "study": config.name,
                "hpcdl_version": __version__,
                "config": config.to_json(),
            }
        )
        trials = handle.create_group("trials")
        for column in table.columns:
            values = table[column]
            if values.dtype == object:
                trials[column] = np.array(
                    [
                        "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                        for v in values
                    ],
                    dtype=h5py.string_dtype(),
                )
            else:
                trials[column] = values.to_numpy(dtype=np.float64)
        curves = handle.create_group("curves")
        for row in rows:
            group = curves.create_group(str(row.number))
            for metric, curve in row.curves.items():
                group[metric] = np.asarray(curve, dtype=np.float64)
    return h5_path, csv_path


def aggregate(config: Config) -> tuple[Path, Path]:
    _, rows = collect(config)
    paths = write_summary(config, rows)
    log.info("%s: %d trials summarised", paths[0], len(rows))
    return paths


# ---------------------------------------------------------------- figures


def _save_figure(draw: Callable[[], Any], path: Path) -> Path | None:
    """Draw with matplotlib and save PNG + SVG; a figure Optuna cannot draw is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        result = draw()
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        log.info("%s: skipped (%s)", path.name, exc)
        plt.close("all")
        return None
    axes = result.flatten()[0] if isinstance(result, np.ndarray) else result
    figure = axes.figure if hasattr(axes, "figure") else plt.gcf()
    figure.set_size_inches(max(figure.get_size_inches()[0], 7), 4.5)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=110)
    figure.savefig(path.with_suffix(".svg"))
    plt.close("all")
    return path.with_suffix(".png")


def learning_curves(rows: list[TrialRow], path: Path, top: list[int]) -> Path | None:
    """Train/val loss and accuracy of the top trials; pruned trials dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = [r for r in rows if r.curves.get("val_loss") and r.number in top]
    if not shown:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in shown:
        style = "--" if row.state == "PRUNED" else "-"
        epochs = np.arange(1, len(row.curves["loss"]) + 1)
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            (line,) = ax.plot(
                epochs,
                row.curves[f"val_{metric}"],
                style,
                marker="o",
                markersize=3,
                label=f"#{row.number} val" + (" (pruned)" if style == "--" else ""),
            )
            ax.plot(epochs, row.curves[metric], style, color=line.get_color(), alpha=0.35)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (faint: train)")
    axes[1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=110)
    figure.savefig(path.with_suffix(".svg"))
    plt.close(figure)
    return path.with_suffix(".png")


def scaling_figure(scaling: dict[str, np.ndarray], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks, speed = scaling["ranks"], scaling["samples_per_second"]
    if len(ranks) == 0:
        return None
    speedup = speed / speed[0] * ranks[0]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(ranks, speedup, "o-", label="measured")
    axes[0].plot(ranks, ranks, "k:", label="ideal")
    axes[0].set(xlabel="ranks", ylabel="speed-up", title="speed-up")
    axes[0].legend()
    axes[1].plot(ranks, speedup / ranks, "o-")
    axes[1].axhline(1.0, color="k", linestyle=":")
    axes[1].set(
        xlabel="ranks",
        ylabel="parallel efficiency",
        ylim=(0, 1.1),
        title="efficiency = speed-up / ranks",
    )
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=110)
    figure.savefig(path.with_suffix(".svg"))
    plt.close(figure)
    return path.with_suffix(".png")


def read_scaling(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with h5py.File(path, "r") as handle:
        return {key: handle[key][()] for key in handle}


def make_figures(config: Config, s: optuna.Study, rows: list[TrialRow], top: list[int],
                 scaling: dict[str, np.ndarray] | None) -> dict[str, Path]:
    """Every figure that the data allows, as PNG (and SVG) in the sweep's figures/ folder."""
    from optuna.visualization import matplotlib as ovm

    folder = config.paths.figures_dir
    folder.mkdir(parents=True, exist_ok=True)
    complete = [r for r in rows if r.state == "COMPLETE"]
    two_objectives = len(s.directions) > 1
    space = list(config.section("search")["space"])
    wanted: dict[str, Callable[[], Any]] = {}
    first = (lambda t: t.values[0]) if two_objectives else None
    name = config.section("search")["metric"]
    if complete:
        wanted["history"] = lambda: ovm.plot_optimization_history(s, target=first, target_name=name)
        wanted["intermediate"] = lambda: ovm.plot_intermediate_values(s)
        if len(complete) >= 2 and space:
            wanted["importances"] = lambda: ovm.plot_param_importances(
                s, target=first, target_name=name
            )
            wanted["slice"] = lambda: ovm.plot_slice(
                s, params=space, target=first, target_name=name
            )
            wanted["parallel"] = lambda: ovm.plot_parallel_coordinate(
                s, params=space, target=first, target_name=name
            )
    if two_objectives and complete:
        wanted["pareto"] = lambda: ovm.plot_pareto_front(s)
    figures = {}
    for key, draw in wanted.items():
        png = _save_figure(draw, folder / key)
        if png:
            figures[key] = png
    curves = learning_curves(rows, folder / "curves", top)
    if curves:
        figures["curves"] = curves
    if scaling is not None:
        png = scaling_figure(scaling, folder / "scaling")
        if png:
            figures["scaling"] = png
    return figures


# ---------------------------------------------------------------- HTML


def reproduce_command(config: Config, row: TrialRow) -> str:
    """The exact `hpcdl train` that re-runs a trial (its params and its seed)."""
    sets = [f"--set {shlex.quote(f'{k}={v}')}" for k, v in row.params.items()]
    seed = study.trial_seed(config.section("search")["seed"], row.number)
    return (
        f"mpirun -np {max(row.ranks, 1)} hpcdl train --config "
        f"{config.paths.config_file} {' '.join(sets)} --set seed={seed} "
        f"--out {config.paths.run_file(f'{config.name}-trial{row.number}')}"
    )


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def ranked(config: Config, rows: list[TrialRow]) -> list[TrialRow]:
    """Complete trials, best first."""
    sign = study.objective_sign(config)
    return sorted(
        (r for r in rows if r.state == "COMPLETE" and r.values), key=lambda r: -sign * r.values[0]
    )  # type: ignore[index]


def render(config: Config, s: optuna.Study, rows: list[TrialRow]) -> Path:
    """Write report.html (self-contained) and the figures beside it."""
    import jinja2
    import yaml

    best_first = ranked(config, rows)
    top = [r.number for r in best_first[:5]] + [r.number for r in rows if r.state == "PRUNED"][:3]
    scaling = read_scaling(config.paths.scaling_h5)
    figures = make_figures(config, s, rows, top, scaling)
    final = config.paths.best_run
    final_run = store.read_run(final) if final.exists() else None
    states = {state.name: sum(1 for r in rows if r.state == state.name) for state in TrialState}
    rank_hours = sum(r.rank_seconds for r in rows) / 3600
    versions = (
        next(
            (
                store.read_run(config.trial_file(r.number)).attrs.get("versions")
                for r in rows
                if r.file_status == "ok"
            ),
            None,
        )
        or {}
    )
    gpus = config.section("resources")["gpus_per_node"]
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
        TEMPLATE
    )
    html = template.render(
        config=config,
        search=config.section("search"),
        rows=rows,
        best_first=best_first,
        best=best_first[0] if best_first else None,
        states=states,
        rank_hours=rank_hours,
        gpu_hours=rank_hours if gpus else 0.0,
        figures={k: _data_uri(v) for k, v in figures.items()},
        final=final_run,
        reproduce=reproduce_command(config, best_first[0]) if best_first else "",
        config_yaml=yaml.safe_dump(config.as_dict(), sort_keys=False),
        versions=versions,
        directions=[d.name.lower() for d in s.directions],
        scaling=scaling,
        fmt=_fmt,
        params=sorted({n for r in rows for n in r.params}),
        hpcdl_version=__version__,
    )
    out = config.paths.report_html
    with store.atomic_path(out) as tmp:
        tmp.write_text(html)
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def report(config: Config) -> Path:
    s, rows = collect(config)
    out = render(config, s, rows)
    log.info("report: %s", out)
    return out


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>hpcdl sweep {{ config.name }}</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
 h1{margin-bottom:.1em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
 table{border-collapse:collapse;font-size:.88em;margin:.5em 0}
 th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}
 th{background:#f3f3f3;cursor:pointer} td.l,th.l{text-align:left}
 .warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em}
 .cards{display:flex;gap:1em;flex-wrap:wrap} .card{border:1px solid #ddd;padding:.6em 1em;
 border-radius:6px;min-width:9em} .card b{font-size:1.4em;display:block}
 img{max-width:100%;border:1px solid #eee;margin:.4em 0} code,pre{background:#f6f6f6}
 pre{padding:.6em;overflow-x:auto;font-size:.85em} .muted{color:#777}
</style></head><body>
<h1>Sweep <code>{{ config.name }}</code></h1>
<p class="muted">{{ rows|length }} trials · {{ search.sampler }} sampler · {{ search.pruner }}
pruner · objective: {{ directions|join(", ") }} {{ search.metric }}
{%- if search.second_objective %} and {{ search.second_objective.metric }}{% endif %}
· hpcdl {{ hpcdl_version }}</p>

<h2>Best model</h2>
{% if best %}
<div class="cards">
 <div class="card">{{ search.metric }}<b>{{ fmt(best.values[0]) }}</b>trial #{{ best.number }},
 epoch {{ best.best_epoch }}</div>
 <div class="card">test accuracy<b>{{ fmt(best.test_accuracy) }}</b>trial's own model</div>
 {% if final %}<div class="card">final retrain (train+val)<b>{{ fmt(final.test.get("accuracy"))
 }}</b>test accuracy</div>{% endif %}
 <div class="card">parameters<b>{{ "{:,}".format(best.n_params or 0) }}</b>{{
 config.params.family }}</div>
</div>
<table><tr><th class="l">parameter</th><th>value</th></tr>
{% for k, v in best.params.items() %}<tr><td class="l">{{ k }}</td><td>{{ fmt(v) }}</td></tr>
{% endfor %}</table>
<p>How sure are we? The next best trials reached
{% for r in best_first[1:4] %}{{ fmt(r.values[0]) }}{% if not loop.last %}, {% endif %}{% endfor
%}{% if best_first|length < 2 %} — no other complete trial to compare with{% endif %}.
Reproduce this trial:</p>
<pre>{{ reproduce }}</pre>
{% else %}
<p class="warn"><b>No trial completed.</b> {{ states.FAIL }} failed, {{ states.PRUNED }} pruned,
{{ states.RUNNING }} still running. The failure reasons are in the table below.</p>
{% endif %}

<h2>Top trials</h2>
<p class="muted">Click a column to sort.</p>
<table id="trials"><thead><tr><th>#</th><th class="l">state</th>
{% for p in params %}<th>{{ p }}</th>{% endfor %}<th>value</th>
{% if search.second_objective %}<th>{{ search.second_objective.metric }}</th>{% endif %}
<th>best epoch</th><th>epochs</th><th>samples/s</th><th>rank·s</th><th class="l">note</th>
</tr></thead><tbody>
{% for r in rows %}<tr><td>{{ r.number }}</td><td class="l">{{ r.state }}</td>
{% for p in params %}<td>{{ fmt(r.params.get(p)) }}</td>{% endfor %}
<td>{{ fmt(r.values[0]) if r.values else "-" }}</td>
{% if search.second_objective %}<td>{{ fmt(r.values[1]) if r.values else "-" }}</td>{% endif %}
<td>{{ fmt(r.best_epoch) }}</td><td>{{ r.epochs_run }}</td><td>{{ fmt(r.samples_per_second, 3)
}}</td><td>{{ fmt(r.rank_seconds, 3) }}</td>
<td class="l">{{ r.fail_reason or (r.file_status if r.file_status != "ok" else "") }}</td></tr>
{% endfor %}</tbody></table>

<h2>What mattered</h2>
{% for key, title in [("history", "Optimisation history (best so far)"),
 ("importances", "Parameter importances"), ("slice", "Slice plots"),
 ("parallel", "Parallel coordinates"), ("pareto", "Pareto front")] %}
{% if key in figures %}<h3>{{ title }}</h3>
<img alt="{{ title }}" src="{{ figures[key] }}">{% endif %}
{% endfor %}
{% if not figures %}<p class="muted">Not enough complete trials to draw.</p>{% endif %}

<h2>Learning curves</h2>
{% if "curves" in figures %}<img alt="learning curves" src="{{ figures.curves }}">{% endif %}
{% if "intermediate" in figures %}<h3>Reported {{ search.metric }} per epoch, all trials
(pruned ones stop early)</h3><img alt="intermediate values" src="{{ figures.intermediate }}">
{% endif %}

<h2>Compute</h2>
<div class="cards">
{% for state, n in states.items() %}{% if n %}<div class="card">{{ state.lower() }}<b>{{ n
}}</b>trials</div>{% endif %}{% endfor %}
 <div class="card">rank-hours<b>{{ fmt(rank_hours, 3) }}</b>{% if gpu_hours %}{{ fmt(gpu_hours, 3)
 }} GPU-hours{% else %}CPU{% endif %}</div>
</div>
{% if scaling %}<h3>Scaling</h3><img alt="scaling" src="{{ figures.scaling }}">{% endif %}

<h2>Provenance</h2>
<table>{% for k, v in versions.items() %}<tr><td class="l">{{ k }}</td><td class="l">{{ v }}</td>
</tr>{% endfor %}</table>
<details><summary>config</summary><pre>{{ config_yaml }}</pre></details>
<script>
document.querySelectorAll("#trials th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
  const key = r => { const t = r.cells[col].textContent.trim(), n = parseFloat(t);
                     return isNaN(n) ? t : n; };
  const dir = th.dataset.dir = th.dataset.dir === "desc" ? "asc" : "desc";
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (dir === "asc" ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}));
</script>
</body></html>
"""
