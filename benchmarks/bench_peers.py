"""Benchmark 9: hpcdl against Ray Tune and KerasTuner on the demo's sweep, side by side.

The job (configs/demo.yaml): Fashion-MNIST from hpcdl's dataset file, hpcdl's MLP over width,
depth, learning rate and dropout, batch 128, Adam, up to 30 epochs, 24 trials, 2 concurrent
trials of 1 process / 1 TensorFlow thread. hpcdl: TPE + Hyperband, 2 `hpcdl worker` processes
on one study. Ray Tune: OptunaSearch (TPE) + ASHA, 2 concurrent trials. KerasTuner: its
Hyperband tuner (one Hyperband iteration), chief + 2 workers in its distributed mode. The peers
run in their own venvs (benchmarks/.venv-ray, .venv-kt, made by `make peer-venvs` from the
pinned benchmarks/peers/requirements-*.txt), with hpcdl's model builder and TensorFlow 2.18.1 +
tf-keras, never in the runtime venv. Systems alternate seed by seed.

Per run: wall time until the best val accuracy reaches 0.885 and 0.895, trials and trial-epochs,
best val accuracy, test accuracy of the best trial trained to its full budget, peak memory (sum
of all the run's processes' PSS, sampled each second), and the share of the 2 slots' wall time
spent outside training epochs. Figure: best-so-far val accuracy against wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import yaml
from common import REPO, append_results, env, fashion_mnist, run_workers, summary
from peers import curves

sys.path.insert(0, str(REPO))

WORK = REPO / "results" / "bench" / "peers"
FIGURE = REPO / "benchmarks" / "peers_curves.png"
PEERS = REPO / "benchmarks" / "peers"
TARGETS = (0.885, 0.895)
SYSTEMS = ("hpcdl", "ray", "kerastuner")
VENVS = {"ray": REPO / "benchmarks" / ".venv-ray", "kerastuner": REPO / "benchmarks" / ".venv-kt"}


class PeakMemory:
    """Peak of the summed PSS of this process's descendants, sampled every `period` seconds
    (PSS shares a library's pages among the processes mapping it, so the sum is not inflated)."""

    def __init__(self, period: float = 1.0) -> None:
        self.period, self.peak, self._stop = period, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.period):
            total = 0
            for proc in me.children(recursive=True):
                try:
                    total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.peak = max(self.peak, total / 2**20)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def hpcdl_config(seed: int, trials: int, epochs: int, workers: int) -> Path:
    """The demo's sweep at this seed, trials and epochs (its space from configs/demo.yaml)."""
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    name = f"hpcdl-seed{seed}"
    demo.update(name=name, results_dir=str(WORK))
    demo["train"]["epochs"] = epochs
    demo["search"].update(n_trials=trials, seed=seed)
    demo["resources"]["workers"] = workers
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    return path


def hpcdl_events(config_path: Path) -> list[dict]:
    """hpcdl's run as events: each trial file's epochs, timed from its Optuna start."""
    from hpcdl import config, store, study

    cfg = config.load(config_path)
    started = {t.number: t.datetime_start.timestamp()
               for t in study.open_study(cfg).get_trials(deepcopy=False) if t.datetime_start}
    events = []
    for path in sorted(cfg.paths.trials_dir.glob("*.h5")):
        run = store.read_run(path)
        number, epochs = int(path.stem), run.epochs
        t0 = started[number]
        for i, (elapsed, val, seconds) in enumerate(zip(
                epochs["elapsed_seconds"], epochs["val_accuracy"], epochs["epoch_seconds"],
                strict=True)):
            events.append({"trial": f"hpcdl-{number}", "t": t0 + float(elapsed), "epoch": i + 1,
                           "val_accuracy": float(val), "train_seconds": float(seconds)})
        if run.test:
            end = t0 + float(epochs["elapsed_seconds"][-1])
            events.append({"trial": f"hpcdl-{number}", "t": end,
                           "test_accuracy": float(run.test["accuracy"]),
                           "epochs": len(epochs["val_accuracy"])})
    return events


def run_peer(command: Sequence[str], log: Path, timeout: float) -> None:
    """A peer's run in its own session; stopped (its events kept) if it outlasts `timeout`."""
    with log.open("w") as out:
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env=env(PYTHONPATH=f"{REPO}:{PEERS}", TF_CPP_MIN_LOG_LEVEL="3"))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
            print(f"  stopped after the {timeout:.0f} s cap; its events are kept")
            return
    if code != 0:
        sys.exit(f"benchmark step failed ({code}): {' '.join(command)}; see {log}")


def peer_venv(system: str) -> Path:
    """The peer's python, its venv made first by `make peer-venvs` if missing."""
    venv = VENVS[system]
    if not (venv / ".installed").exists():
        subprocess.run(["make", "-C", str(REPO), "peer-venvs"], check=True)
    return venv / "bin" / "python"


def launch(system: str, seed: int, args: argparse.Namespace, run_dir: Path,
           events: Path) -> Callable[[], None]:
    """What starts one system's sweep (it returns when the sweep has ended)."""
    common = ["--dataset", str(fashion_mnist()), "--events", str(events), "--seed", str(seed),
              "--epochs", str(args.epochs)]
    if system == "hpcdl":
        config_path = hpcdl_config(seed, args.trials, args.epochs, args.concurrent)
        return lambda: run_workers(config_path, args.concurrent)
    if system == "ray":
        command = [str(peer_venv("ray")), str(PEERS / "run_ray.py"), *common, "--storage",
                   str(run_dir), "--trials", str(args.trials), "--concurrent",
                   str(args.concurrent), *(["--reuse-actors"] if args.ray_reuse_actors else [])]
    else:
        command = [str(peer_venv("kerastuner")), str(PEERS / "run_kt.py"), *common,
                   "--directory", str(run_dir), "--workers", str(args.kt_workers)]
    return lambda: run_peer(command, run_dir / "run.log", args.timeout)


def run_system(system: str, seed: int, args: argparse.Namespace) -> curves.RunFigures:
    """One system's sweep from scratch, measured; its events and timing kept in its run
    directory (results/bench/peers/<system>-seed<n>/), so --report-only can redo the figures."""
    run_dir = WORK / f"{system}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    events_path = run_dir / "events.jsonl"
    start = launch(system, seed, args, run_dir, events_path)
    print(f"seed {seed}: {system} ...", flush=True)
    t0 = time.time()
    with PeakMemory() as memory:
        start()
    t_end = time.time()
    if system == "hpcdl":
        events = hpcdl_events(WORK / f"hpcdl-seed{seed}.yaml")
        events_path.write_text("".join(json.dumps(e) + "\n" for e in events))
    slots = args.concurrent if system != "kerastuner" else args.kt_workers
    (run_dir / "run.json").write_text(json.dumps(
        {"system": system, "seed": seed, "t0": t0, "t_end": t_end, "slots": slots,
         "peak_mib": memory.peak}))
    result = recorded_run(run_dir)
    print(f"  {result}", flush=True)
    return result


def recorded_run(run_dir: Path) -> curves.RunFigures:
    """A run's figures from what its run directory kept."""
    meta = json.loads((run_dir / "run.json").read_text())
    events_path = run_dir / "events.jsonl"
    events = curves.read_events(events_path) if events_path.exists() else []
    return curves.figures(meta["system"], meta["seed"], events, meta["t0"], meta["t_end"],
                          meta["slots"], meta["peak_mib"], TARGETS)


def plot(runs: Sequence[curves.RunFigures], figure: Path) -> None:
    """Best-so-far val accuracy against wall time, every system and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(SYSTEMS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labelled: set[str] = set()
    for run in runs:
        if not run.curve:
            continue
        xs, ys = zip(*run.curve, (run.wall_seconds, run.curve[-1][1]), strict=True)
        ax.step([x / 60 for x in xs], ys, where="post", color=colours[run.system], alpha=0.8,
                label=None if run.system in labelled else run.system)
        labelled.add(run.system)
    for target in TARGETS:
        ax.axhline(target, color="grey", lw=0.7, ls=":")
    ax.set(xlabel="wall time (min)", ylabel="best val accuracy so far",
           title="Demo sweep (Fashion-MNIST MLP): hpcdl vs Ray Tune vs KerasTuner")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=110)


def minutes(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds / 60:.1f}"


def table(runs: Sequence[curves.RunFigures]) -> list[list[str]]:
    """One row per run, then one per system with the medians over its seeds."""
    rows = [["system", "seed", "wall (min)", *(f"min to {t}" for t in TARGETS), "trials",
             "trial-epochs", "best val", "test of best full trial", "peak memory (MiB)",
             "outside epochs"]]
    for run in runs:
        rows.append([run.system, str(run.seed), f"{run.wall_seconds / 60:.1f}",
                     *(minutes(run.to_targets[t]) for t in TARGETS), str(run.trials),
                     str(run.trial_epochs), f"{run.best_val:.4f}",
                     "none" if run.test is None else f"{run.test:.4f}", f"{run.peak_mib:.0f}",
                     f"{run.overhead:.0%}"])
    for system in SYSTEMS:
        mine = [run for run in runs if run.system == system]
        if not mine:
            continue
        tests = [run.test for run in mine if run.test is not None]
        rows.append([f"**{system}** median", "", summary([r.wall_seconds / 60 for r in mine]),
                     *(minutes(curves.median_time([r.to_targets[t] for r in mine]))
                       for t in TARGETS),
                     summary([r.trials for r in mine]), summary([r.trial_epochs for r in mine]),
                     summary([r.best_val for r in mine]), summary(tests) if tests else "none",
                     summary([r.peak_mib for r in mine]),
                     summary([round(100 * r.overhead, 1) for r in mine]) + " %"])
    return rows


def verdict(runs: Sequence[curves.RunFigures]) -> str:
    """The issue's goal: hpcdl reaches each target in <= 0.8x the best peer's median wall time,
    with equal or better final accuracy."""
    systems = [s for s in SYSTEMS if any(run.system == s for run in runs)]
    parts = []
    for target in TARGETS:
        medians = {s: curves.median_time([r.to_targets[target] for r in runs if r.system == s])
                   for s in systems}
        peers = [m for s, m in medians.items() if s != "hpcdl" and m is not None]
        ours = medians.get("hpcdl")
        if ours is None:
            parts.append(f"{target}: hpcdl's median run did not reach it")
        elif not peers:
            parts.append(f"{target}: hpcdl {ours / 60:.1f} min, no peer's median run reached it")
        else:
            ratio = ours / min(peers)
            parts.append(f"{target}: hpcdl {ours / 60:.1f} min = {ratio:.2f}x the best peer's "
                         f"{min(peers) / 60:.1f} min ({'met' if ratio <= 0.8 else 'not met'})")
    best = {s: statistics.median([r.best_val for r in runs if r.system == s]) for s in systems}
    parts.append("median best val " + ", ".join(f"{s} {v:.4f}" for s, v in best.items()))
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 6 trials of up to 3 epochs: proves the pipeline, < 10 min")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24, help="hpcdl's and Ray's trials")
    parser.add_argument("--epochs", type=int, default=30, help="a trial's maximum epochs")
    parser.add_argument("--concurrent", type=int, default=2, help="concurrent trials")
    parser.add_argument("--kt-workers", type=int, default=2,
                        help="KerasTuner workers (distributed mode if > 1)")
    parser.add_argument("--ray-reuse-actors", action="store_true",
                        help="sensitivity check: Ray reuses trial processes (its default: not)")
    parser.add_argument("--timeout", type=float, default=3600, help="cap per run, seconds")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--report-only", action="store_true",
                        help="no runs: table, plot and RESULTS.md from the kept run directories")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials, args.epochs, args.timeout = 1, 6, 3, 600
    systems = args.systems.split(",")
    figure = FIGURE.with_name("peers_curves-quick.png") if args.quick else FIGURE
    WORK.mkdir(parents=True, exist_ok=True)
    fashion_mnist(WORK)
    order = [(seed, system) for seed in range(args.seeds)  # alternate; who starts rotates
             for system in systems[seed % len(systems):] + systems[:seed % len(systems)]]
    runs = [recorded_run(WORK / f"{system}-seed{seed}") if args.report_only
            else run_system(system, seed, args) for seed, system in order]
    plot(runs, figure)
    append_results("9. hpcdl vs Ray Tune vs KerasTuner on the demo's sweep", table(runs),
                   notes(args, figure, runs))


def notes(args: argparse.Namespace, figure: Path, runs: Sequence[curves.RunFigures]) -> str:
    """What ran and how the figures are defined, and the verdict on the issue's goal."""
    return (
        f"Job: {args.trials} trials (KerasTuner: one Hyperband iteration) of up to "
        f"{args.epochs} epochs, {args.concurrent} concurrent trials of 1 process / 1 TF thread "
        f"(KerasTuner: chief + {args.kt_workers} worker(s)); Ray reuse_actors "
        f"{args.ray_reuse_actors} (Ray's default False: a new process per trial); "
        "Fashion-MNIST 54000 train / 6000 val / 10000 test from hpcdl's dataset file; hpcdl's "
        "MLP builder (imported in the peer venvs), width 32-512 (log), depth 1-3, lr 1e-4-1e-2 "
        "(log), dropout 0-0.5, batch 128, Adam; TensorFlow 2.18.1 + tf-keras 2.18.0 "
        "everywhere. hpcdl: TPE + Hyperband, 2 `hpcdl worker`. Peer venvs: "
        f"{peer_versions()}. Times from each system's start; best val counts every trained "
        "epoch of every trial; test accuracy is that of the best trial trained to its full "
        "budget; memory is the peak of the summed PSS of all the run's processes; 'outside "
        "epochs' is the share of the slots' wall time not spent in training epochs. Figure: "
        f"[{figure.name}]({figure.name}). Goal: {verdict(runs)}."
        + (" Quick mode: a smoke run proving the pipeline end to end, not a measurement."
           if args.quick else ""))


def peer_versions() -> str:
    """The peers' packages and versions, read from their venvs."""
    found = []
    for system, packages in (("ray", "ray optuna"), ("kerastuner", "keras-tuner")):
        python = VENVS[system] / "bin" / "python"
        if python.exists():
            done = subprocess.run(
                [str(python), "-c", "import sys, importlib.metadata as m; "
                 "print(', '.join(f'{p} {m.version(p)}' for p in sys.argv[1:]))",
                 *packages.split(), "tensorflow", "tf-keras"],
                capture_output=True, text=True, check=False)
            found.append(f"{system}: {done.stdout.strip() or 'not installed'}")
    return "; ".join(found)


if __name__ == "__main__":
    main()
