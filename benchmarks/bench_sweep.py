"""Benchmark 4: sweep efficiency. TPE + Hyperband against random search on Fashion-MNIST with
the MLP space (width, depth, learning rate, dropout), 3 seeds each, alternated seed by seed.

Random search gets N trials of E epochs: a budget of B = N x E epochs. TPE + Hyperband gets
twice the trials and its curve is cut at the same B epochs (pruned trials spend fewer). Both
run as two concurrent `hpcdl worker` processes (1 rank, 1 thread each) on one study, like a
real sweep. Epochs are counted in completion order; a trial counts towards the best value only
once it is complete (a pruned trial's partial accuracy is not a model anyone gets). Goal: TPE +
Hyperband reaches random search's final best val accuracy with <= 50 % of the epochs.

A finished sweep is reused on a rerun (its study is complete); --rerun starts afresh."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from common import REPO, append_results, fashion_mnist, run_workers

sys.path.insert(0, str(REPO))

WORK = REPO / "results" / "bench" / "sweep"
FIGURE = REPO / "benchmarks" / "sweep_efficiency.png"
SPACE = {
    "width": {"type": "int", "low": 32, "high": 512, "log": True},
    "depth": {"type": "int", "low": 1, "high": 3},
    "learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}
METHODS = {"random": ("random", "none"), "tpe+hyperband": ("tpe", "hyperband")}


@dataclass
class Curve:
    """Best-so-far val accuracy after each finished trial, against epochs spent so far."""

    epochs: list[int]
    best: list[float]
    n_trials: int

    def epochs_to_reach(self, target: float) -> int | None:
        return next((e for e, b in zip(self.epochs, self.best, strict=True) if b >= target), None)


def sweep_config(method: str, seed: int, n_trials: int, epochs: int) -> Path:
    sampler, pruner = METHODS[method]
    name = f"{method.replace('+', '-')}-seed{seed}"
    doc = {
        "name": name,
        "results_dir": str(WORK),
        "dataset": {"name": "fashion_mnist"},
        "model": {"family": "mlp"},
        "train": {"epochs": epochs, "batch_size": 128, "intra_op_threads": 1},
        "search": {"n_trials": n_trials, "sampler": sampler, "pruner": pruner, "seed": seed,
                   "space": SPACE},
    }
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_curve(config_path: Path, budget: int) -> Curve:
    from optuna.trial import TrialState

    from hpcdl import config, study

    cfg = config.load(config_path)
    trials = [t for t in study.open_study(cfg).get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    trials.sort(key=lambda t: t.datetime_complete)
    spent, best, curve = 0, 0.0, Curve([], [], 0)
    for trial in trials:
        spent += len(trial.intermediate_values)
        if spent > budget:
            break
        if trial.state == TrialState.COMPLETE:
            best = max(best, trial.value)
        curve.epochs.append(spent)
        curve.best.append(best)
        curve.n_trials += 1
    return curve


def plot(curves: dict[str, list[Curve]], budget: int, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (method, runs), colour in zip(curves.items(), ("tab:grey", "tab:blue"), strict=True):
        for i, curve in enumerate(runs):
            # from the first complete trial on: before it there is no model to speak of
            found = [(e, b) for e, b in zip(curve.epochs, curve.best, strict=True) if b > 0]
            if not found:
                continue
            ax.step(*zip(*found, strict=True), where="post", color=colour, alpha=0.8,
                    label=method if i == 0 else None)
    ax.set(xlabel="epochs spent (all trials)", ylabel="best val accuracy so far",
           xlim=(0, budget), title="Fashion-MNIST MLP sweep: TPE + Hyperband vs random")
    firsts = [b for runs in curves.values() for c in runs for b in c.best if b > 0]
    if firsts:
        ax.set_ylim(bottom=min(firsts) - 0.005)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 trials of 2 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16, help="random search's trials")
    parser.add_argument("--epochs", type=int, default=9, help="epochs of a full trial")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rerun", action="store_true", help="delete finished sweeps first")
    args = parser.parse_args()
    seeds, trials, epochs = (2, 3, 2) if args.quick else (args.seeds, args.trials, args.epochs)
    # a quick run's figure must not replace the full run's, which RESULTS.md's findings show
    figure = FIGURE.with_name("sweep_efficiency-quick.png") if args.quick else FIGURE
    budget = trials * epochs
    if args.rerun:
        shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    fashion_mnist(WORK)
    curves: dict[str, list[Curve]] = {method: [] for method in METHODS}
    for seed in range(seeds):  # alternate the two methods seed by seed
        for method in METHODS:
            n = trials if method == "random" else 2 * trials
            path = sweep_config(method, seed, n, epochs)
            run_workers(path, args.workers)
            curves[method].append(read_curve(path, budget))
    plot(curves, budget, figure)

    table = [["seed", "random: trials, best", "TPE+HB: trials, best",
              "TPE+HB epochs to random's best", "fraction of budget"]]
    fractions = []
    for seed, (rand, tpe) in enumerate(zip(curves["random"], curves["tpe+hyperband"],
                                           strict=True)):
        target = rand.best[-1] if rand.best else 0.0
        reached = tpe.epochs_to_reach(target)
        fraction = reached / budget if reached is not None else float("inf")
        fractions.append(fraction)
        table.append([str(seed), f"{rand.n_trials}, {target:.4f}",
                      f"{tpe.n_trials}, {max(tpe.best, default=0.0):.4f}",
                      str(reached) if reached is not None else "not reached",
                      f"{fraction:.2f}" if reached is not None else "> 1"])
    median = statistics.median(fractions)
    table.append(["median", "", "", "", f"{median:.2f}" if median <= 1 else "> 1"])
    verdict = "met" if median <= 0.5 else "not met"
    append_results(
        "4. Sweep efficiency: TPE + Hyperband vs random search",
        table,
        f"Fashion-MNIST (54000 train / 6000 val), MLP space width 32-512 (log), depth 1-3, "
        f"learning rate 1e-4-1e-2 (log), dropout 0-0.5; batch 128, Adam; objective: best "
        f"epoch's val accuracy. Budget per sweep: {trials} random trials x {epochs} epochs = "
        f"{budget} epochs; TPE (multivariate) + Hyperband (min 1, max {epochs} epochs, "
        f"reduction 3) may run up to {2 * trials} trials within the same {budget} epochs. "
        f"{args.workers} concurrent workers (1 rank, 1 thread) per study. Only complete trials "
        f"count towards the best. Figure: [{figure.name}]({figure.name}). "
        f"Goal (TPE+HB reaches random's final best with <= 50 % of the epochs): {verdict}, "
        f"median fraction {median:.2f}.".replace("inf", "> 1 (not reached)"))


if __name__ == "__main__":
    main()
