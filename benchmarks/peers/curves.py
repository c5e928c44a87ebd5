"""Benchmark 9's figures from a run's event log (pure: no TensorFlow, no tuner).

An event is one trained epoch of one trial — {"trial", "t" (Unix seconds), "epoch",
"val_accuracy", "train_seconds"} — or a trial's test result after its full budget —
{"trial", "t", "test_accuracy", "epochs"}. Every system's run is reduced to these, so one
definition serves all: the best-so-far curve counts every trained epoch of every trial (a
pruned or stopped trial's epoch is a model the system trained), training seconds run from an
epoch's start to the start of its validation.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Event = Mapping[str, Any]


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an event file (a torn last line from a killed run is skipped)."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def epochs_of(events: Iterable[Event]) -> list[Event]:
    return sorted((e for e in events if "val_accuracy" in e), key=lambda e: e["t"])


def best_so_far(events: Iterable[Event], t0: float) -> list[tuple[float, float]]:
    """(seconds since t0, best val accuracy so far) at each epoch that improved it."""
    curve: list[tuple[float, float]] = []
    for event in epochs_of(events):
        if not curve or event["val_accuracy"] > curve[-1][1]:
            curve.append((event["t"] - t0, event["val_accuracy"]))
    return curve


def time_to(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """Seconds until the best val accuracy first reached `target`; None if it never did."""
    return next((seconds for seconds, best in curve if best >= target), None)


def best_test(events: Iterable[Event]) -> tuple[float, float | None]:
    """Best val accuracy of any epoch, and the test accuracy of the trial that holds the best
    val accuracy among the trials trained to their full budget (None if none was)."""
    events = list(events)
    best_val: dict[str, float] = {}
    for event in epochs_of(events):
        best_val[event["trial"]] = max(best_val.get(event["trial"], 0.0), event["val_accuracy"])
    tested = {e["trial"]: e["test_accuracy"] for e in events if "test_accuracy" in e}
    full = [trial for trial in tested if trial in best_val]
    test = tested[max(full, key=best_val.__getitem__)] if full else None
    return max(best_val.values(), default=0.0), test


@dataclass
class RunFigures:
    """One system's run on one seed, as the table shows it."""

    system: str
    seed: int
    wall_seconds: float
    to_targets: dict[float, float | None]
    trials: int
    trial_epochs: int
    best_val: float
    test: float | None
    peak_mib: float
    overhead: float  # share of the slots' wall time spent outside training epochs
    curve: list[tuple[float, float]] = field(default_factory=list, repr=False)


def figures(system: str, seed: int, events: Sequence[Event], t0: float, t_end: float,
            slots: int, peak_mib: float, targets: Sequence[float]) -> RunFigures:
    """Reduce one run's events (started at t0, ended at t_end, `slots` concurrent trials)."""
    epochs = epochs_of(events)
    curve = best_so_far(epochs, t0)
    best_val, test = best_test(events)
    wall = t_end - t0
    training = sum(e["train_seconds"] for e in epochs)
    return RunFigures(system, seed, wall, {target: time_to(curve, target) for target in targets},
                      len({e["trial"] for e in epochs}), len(epochs), best_val, test, peak_mib,
                      1 - training / (slots * wall) if wall > 0 else 0.0, curve)


def median_time(values: Sequence[float | None]) -> float | None:
    """Median seconds to a target over seeds, a seed that never reached it counting as
    infinitely late; None if the median itself is such a seed."""
    median = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(median) else median
