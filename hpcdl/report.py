"""Aggregate a sweep into summary.h5/.csv, and render report.html (+ PNG figures beside it).

The report answers: what is the best model, how sure are we, what mattered, what did it cost.
Figures come from Optuna's visualisation module (matplotlib backend, so PNGs need no browser),
embedded in the HTML as data URIs: one self-contained file to mail to the group. The page is
the package template templates/report.html.j2; the HDF5 layout of summary.h5 is store.py's.
"""

from __future__ import annotations

import base64
import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from hpcdl import __version__, store, study
from hpcdl.config import Config
from hpcdl.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("hpcdl.report")


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
    seed: int
    curves: dict[str, list[float]] = field(default_factory=dict)
    placement: str = ""  # where its ranks ran (store.placement_text), "" if not recorded

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
        seed=study.seed_of(config, trial),
        curves=run.epochs if run else {},
        placement=store.placement_text(run.attrs["placement"])
        if run and "placement" in run.attrs else "",
    )


def collect(config: Config) -> tuple[optuna.Study, list[TrialRow]]:
    """The study and every trial joined with its run file."""
    s = study.load_study(config)
    return s, [trial_row(config, t) for t in s.get_trials(deepcopy=False)]


def summary_table(rows: list[TrialRow]) -> pd.DataFrame:
    """One row per trial: the columns of summary.csv and of summary.h5's /trials."""
    import pandas as pd

    names = sorted({name for row in rows for name in row.params})
    return pd.DataFrame(
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


def write_summary(config: Config, rows: list[TrialRow]) -> tuple[Path, Path]:
    """summary.h5 (one row per trial plus every trial's curves) and summary.csv."""
    table = summary_table(rows)
    csv_path, h5_path = config.paths.summary_csv, config.paths.summary_h5
    with store.atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    store.write_summary(
        h5_path,
        {"study": config.name, "hpcdl_version": __version__, "config": config.to_json()},
        {column: table[column].to_numpy() for column in table.columns},
        {row.number: row.curves for row in rows},
    )
    return h5_path, csv_path


def aggregate(config: Config) -> tuple[Path, Path]:
    """`hpcdl aggregate`: the sweep's trials -> summary.h5 and summary.csv."""
    _, rows = collect(config)
    paths = write_summary(config, rows)
    log.info("%s: %d trials summarised", paths[0], len(rows))
    return paths


# ---------------------------------------------------------------- figures


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: figures are files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    """PNG (embedded in the report) and SVG (for papers) beside each other; frees the figure."""
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=110)
    figure.savefig(path.with_suffix(".svg"))
    _pyplot().close(figure)
    return path.with_suffix(".png")


def optuna_figure(draw: Callable[[], Any], path: Path) -> Path | None:
    """One of Optuna's matplotlib plots, saved; a figure Optuna cannot draw is skipped."""
    plt = _pyplot()
    try:
        result = draw()
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        log.info("%s: skipped (%s)", path.name, exc)
        plt.close("all")
        return None
    axes = result.flatten()[0] if isinstance(result, np.ndarray) else result
    figure = axes.figure if hasattr(axes, "figure") else plt.gcf()
    figure.set_size_inches(max(figure.get_size_inches()[0], 7), 4.5)
    return _save(figure, path)


def learning_curves(rows: list[TrialRow], path: Path, top: list[int]) -> Path | None:
    """Train/val loss and accuracy of the top trials; pruned trials dashed."""
    from matplotlib.ticker import MaxNLocator

    shown = [r for r in rows if r.curves.get("val_loss") and r.number in top]
    if not shown:
        return None
    figure, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2))
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
    return _save(figure, path)


def scaling_figure(scaling: dict[str, np.ndarray], path: Path) -> Path | None:
    """Speed-up and parallel efficiency against the number of ranks, with the ideal lines."""
    ranks, speed = scaling["ranks"], scaling["samples_per_second"]
    if len(ranks) == 0:
        return None
    speedup = speed / speed[0] * ranks[0]
    figure, axes = _pyplot().subplots(1, 2, figsize=(10, 4))
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
    return _save(figure, path)


def optuna_plots(
    config: Config, s: optuna.Study, rows: list[TrialRow]
) -> dict[str, Callable[[], Any]]:
    """Optuna's plots that the trials allow, by figure name, not yet drawn."""
    from optuna.visualization import matplotlib as ovm

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
    return wanted


def make_figures(config: Config, s: optuna.Study, rows: list[TrialRow], top: list[int],
                 scaling: dict[str, np.ndarray] | None) -> dict[str, Path]:
    """Every figure that the data allows, as PNG (and SVG) in the sweep's figures/ folder."""
    folder = config.paths.figures_dir
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {key: optuna_figure(draw, folder / key)
             for key, draw in optuna_plots(config, s, rows).items()}
    drawn["curves"] = learning_curves(rows, folder / "curves", top)
    if scaling is not None:
        drawn["scaling"] = scaling_figure(scaling, folder / "scaling")
    return {key: png for key, png in drawn.items() if png}


# ---------------------------------------------------------------- HTML


def reproduce_command(config: Config, row: TrialRow) -> str:
    """The exact `hpcdl train` that re-runs a trial (its params and its seed)."""
    sets = [f"--set {shlex.quote(f'{k}={v}')}" for k, v in row.params.items()]
    return (
        f"mpirun -np {max(row.ranks, 1)} hpcdl train --config "
        f"{config.paths.config_file} {' '.join(sets)} --set seed={row.seed} "
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


def curve_trials(rows: list[TrialRow], best_first: list[TrialRow]) -> list[int]:
    """The trials whose learning curves are drawn: the five best and the first pruned ones."""
    return [r.number for r in best_first[:5]] + [r.number for r in rows if r.state == "PRUNED"][:3]


def first_versions(config: Config, rows: list[TrialRow]) -> dict[str, str]:
    """The software versions recorded by the first readable trial file (provenance)."""
    return (
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


def render(config: Config, s: optuna.Study, rows: list[TrialRow], figures: dict[str, Path],
           scaling: dict[str, np.ndarray] | None) -> Path:
    """Assemble report.html (self-contained) from the trials and the figures already drawn."""
    import yaml

    best_first = ranked(config, rows)
    final = config.paths.best_run
    final_run = store.read_run(final) if final.exists() else None
    states = {state.name: sum(1 for r in rows if r.state == state.name) for state in TrialState}
    rank_hours = sum(r.rank_seconds for r in rows) / 3600
    gpus = config.section("resources")["gpus_per_node"]
    environment = jinja2.Environment(loader=jinja2.PackageLoader("hpcdl", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    html = environment.get_template("report.html.j2").render(
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
        versions=first_versions(config, rows),
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
    """Draw every figure the sweep allows, then write report.html around them."""
    s, rows = collect(config)
    try:
        scaling = store.read_scaling(config.paths.scaling_h5)
    except ValueError as exc:  # a foreign file where scaling.h5 belongs: the user's to fix
        raise UserError(str(exc)) from exc
    top = curve_trials(rows, ranked(config, rows))
    figures = make_figures(config, s, rows, top, scaling)
    out = render(config, s, rows, figures, scaling)
    log.info("report: %s", out)
    return out
