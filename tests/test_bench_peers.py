"""benchmarks/bench_peers.py (benchmark 9): the figures from an event log, the peers' job being
the demo's, and the peers' packages kept out of the runtime venv."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from hpcdl import config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "peers"))

from peers import curves

T0 = 1_000.0


def epoch(trial: str, t: float, val: float, seconds: float = 10.0) -> dict:
    return {"trial": trial, "t": T0 + t, "epoch": 1, "val_accuracy": val,
            "train_seconds": seconds}


EVENTS = [
    epoch("a", 30, 0.80), epoch("b", 35, 0.84), epoch("a", 60, 0.86),
    epoch("b", 70, 0.83),  # b pruned after 2 epochs
    epoch("a", 90, 0.889), {"trial": "a", "t": T0 + 91, "test_accuracy": 0.88, "epochs": 3},
    epoch("c", 120, 0.896),  # c's best is the best of all, but c was stopped early
]


def test_best_so_far_counts_every_trained_epoch_in_time_order() -> None:
    shuffled = list(reversed(EVENTS))
    assert curves.best_so_far(shuffled, T0) == [(30, 0.80), (35, 0.84), (60, 0.86),
                                                 (90, 0.889), (120, 0.896)]


def test_time_to_target_is_the_first_epoch_at_or_above_it() -> None:
    curve = curves.best_so_far(EVENTS, T0)
    assert curves.time_to(curve, 0.885) == 90
    assert curves.time_to(curve, 0.896) == 120
    assert curves.time_to(curve, 0.9) is None


def test_test_accuracy_is_the_best_full_budget_trials() -> None:
    assert curves.best_test(EVENTS) == (0.896, 0.88)
    assert curves.best_test(EVENTS[:4]) == (0.86, None)


def test_figures_of_a_run() -> None:
    run = curves.figures("ray", 0, EVENTS, T0, T0 + 150, 2, 1234.0, (0.885, 0.895))
    assert run.to_targets == {0.885: 90, 0.895: 120}
    assert (run.trials, run.trial_epochs, run.wall_seconds) == (3, 6, 150)
    assert run.overhead == pytest.approx(1 - 60 / 300)


def test_median_time_counts_a_miss_as_infinitely_late() -> None:
    assert curves.median_time([60.0, None, 90.0]) == 90.0
    assert curves.median_time([60.0, None, None]) is None


def test_a_torn_last_line_of_a_killed_run_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EVENTS[:2]) + '{"trial": "a", "t"')
    assert curves.read_events(path) == EVENTS[:2]


def test_the_peers_job_is_the_demos() -> None:
    """The peers train hpcdl's own builder; what they pass it must be the demo's settings."""
    job = pytest.importorskip("job")  # benchmarks/peers/job.py: h5py + hpcdl, no TensorFlow
    demo = config.load(REPO / "configs" / "demo.yaml")
    params = demo.params
    assert {k: params[k] for k in job.MODEL_DEFAULTS} == job.MODEL_DEFAULTS
    assert (params["optimizer"], params["batch_size"]) == ("adam", job.BATCH_SIZE)
    space = demo.section("search")["space"]
    assert {k: (v["low"], v["high"]) for k, v in space.items()} == job.SPACE


def test_peer_packages_never_enter_the_runtime() -> None:
    """Ray and KerasTuner live in benchmarks/.venv-*; the runtime venv and the image's pins
    (requirements.in/.lock, the one install recipe) must not have them."""
    for module in ("ray", "keras_tuner", "kerastuner"):
        assert importlib.util.find_spec(module) is None, f"{module} is in the runtime venv"
    assert not [p for p in sys.path if ".venv-" in p]
    for pins in ("requirements.in", "requirements.lock"):
        names = [line.split("=")[0].split("[")[0].strip().lower()
                 for line in (REPO / pins).read_text().splitlines()]
        assert not {"ray", "keras-tuner", "keras_tuner"} & set(names), pins


def test_figures_of_a_recorded_ray_run() -> None:
    """tests/data/peers_ray_events.jsonl: Ray Tune's quick run (6 trials of <= 3 epochs, ASHA
    stopped two after 1 epoch; those have no test result)."""
    events = curves.read_events(REPO / "tests" / "data" / "peers_ray_events.jsonl")
    t0 = 1796235325.8327143  # the first epoch's end
    run = curves.figures("ray", 0, events, t0, t0 + 180, 2, 0.0, (0.86, 0.865, 0.9))
    assert (run.trials, run.trial_epochs) == (6, 14)
    assert run.to_targets[0.86] == pytest.approx(1796235336.9323626 - t0)
    assert run.to_targets[0.865] == pytest.approx(1796235498.3382852 - t0)
    assert run.to_targets[0.9] is None
    assert (round(run.best_val, 4), round(run.test, 4)) == (0.8673, 0.8646)


def run_of(system: str, seed: int, to_885: float | None, best: float) -> curves.RunFigures:
    return curves.RunFigures(system, seed, 600.0, {0.885: to_885, 0.895: None}, 24, 300, best,
                             None, 1000.0, 0.1)


def test_verdict_compares_medians_with_the_best_peers() -> None:
    bench_peers = pytest.importorskip("bench_peers")
    runs = [run_of("hpcdl", s, t, 0.89) for s, t in enumerate((60.0, 70.0, 400.0))]
    runs += [run_of("ray", s, t, 0.888) for s, t in enumerate((100.0, 110.0, None))]
    runs += [run_of("kerastuner", s, None, 0.87) for s in range(3)]
    text = bench_peers.verdict(runs)
    assert "0.885: hpcdl 1.2 min = 0.64x the best peer's 1.8 min (met)" in text
    assert "0.895: hpcdl's median run did not reach it" in text
    # a run of some systems only (--systems) still gets a verdict
    assert "0.885: hpcdl 1.2 min, no peer's" in bench_peers.verdict(runs[:3] + runs[6:])
