"""Benchmark 7: how much of the local demo sweep's time is spent outside training epochs
(process start, TF import, Snakemake, storage, validation, checkpoints, report). Runs the sweep
from scratch `--reps` times with Snakemake's local profile and reads, each time, the Snakemake
benchmark records (`benchmark:` TSVs) and the run files the sweep wrote."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from common import REPO, append_results, run, summary

sys.path.insert(0, str(REPO))
COLUMNS = ("job", "fit", "epochs", "in_run")


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: wall time during which any job ran."""
    covered, reach = 0.0, -float("inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def split_times(sweep_dir: Path, wall_seconds: float) -> dict[str, dict[str, float]]:
    """Per Snakemake rule: job seconds, and of them: in Keras fit, in training epochs (fit plus
    each epoch's validation, checkpoint and run-file write), inside training runs. Plus
    Snakemake's own time: the sweep's wall time during which no job ran."""
    from hpcdl import store

    times: dict[str, dict[str, float]] = {}
    jobs = []
    for tsv in sorted((sweep_dir / "benchmarks").glob("*.tsv")):
        with tsv.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        rule = times.setdefault(tsv.stem.split("-")[0], dict.fromkeys(COLUMNS, 0.0))
        rule["job"] += float(row["s"])
        end = tsv.stat().st_mtime  # Snakemake writes the record as the job ends
        jobs.append((end - float(row["s"]), end))
    snakemake_alone = wall_seconds - covered_seconds(jobs)
    times["snakemake"] = {**dict.fromkeys(COLUMNS, 0.0), "job": max(snakemake_alone, 0.0)}
    run_files = [*(sweep_dir / "trials").glob("*.h5"), sweep_dir / "best" / "run.h5",
                 *(sweep_dir / "scaling").glob("*.h5")]
    for path in run_files:
        record = store.read_run(path)
        name = {"trials": "worker", "best": "final"}.get(path.parent.name, "scaling")
        if name not in times:  # only runs of jobs Snakemake timed
            continue
        # rank 0's wall clock: `elapsed_seconds` runs from entering `train` to each epoch's end
        fit, elapsed = record.epochs["epoch_seconds"], record.epochs["elapsed_seconds"]
        times[name]["fit"] += sum(fit)
        times[name]["epochs"] += elapsed[-1] - elapsed[0] + fit[0]  # first epoch's start to end
        times[name]["in_run"] += elapsed[-1]
    times["all"] = {c: sum(rule[c] for rule in times.values()) for c in COLUMNS}
    return times


def epochs_trained(trials_dir: Path) -> int:
    """Training epochs of all the sweep's trials (the work its wall time bought)."""
    from hpcdl import store

    return sum(len(store.read_run(path).epochs["epoch_seconds"])
               for path in trials_dir.glob("*.h5"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--reps", type=int, default=5, help="sweeps run from scratch")
    parser.add_argument("--quick", action="store_true",
                        help="the smoke sweep (configs/smoke.yaml, a minute) once")
    args = parser.parse_args()
    config_path, reps = ("configs/smoke.yaml", 1) if args.quick else (args.config, args.reps)
    os.chdir(REPO)  # the sweep's paths, and Snakemake's, are relative to the repository
    from hpcdl import config

    cfg = config.load(REPO / config_path)
    runs, walls, trial_epochs, loads = [], [], [], []
    for rep in range(reps):
        print(f"bench_pipeline: sweep {rep + 1}/{reps} of {config_path}", flush=True)
        run(["rm", "-rf", str(cfg.sweep_dir)])
        started = time.perf_counter()
        run(["snakemake", "--profile", "profiles/local", "--configfile", config_path])
        wall = time.perf_counter() - started
        runs.append(split_times(cfg.sweep_dir, wall))
        walls.append(wall / 60)
        trial_epochs.append(epochs_trained(cfg.sweep_dir / "trials"))
        loads.append(os.getloadavg()[2])  # other work on the machine during the sweep

    def part(times: dict[str, float], value: str) -> float:
        """One quantity of one rule in one sweep."""
        job = times["job"] or 1.0
        return {"job": times["job"], "fit": times["fit"], "epochs": times["epochs"],
                "setup": times["in_run"] - times["epochs"],
                "outside_runs": times["job"] - times["in_run"],
                "outside_epochs": (1 - times["epochs"] / job) * 100,
                "outside_fit": (1 - times["fit"] / job) * 100}[value]

    table = [["rule", "job seconds (snakemake: alone)", "in Keras fit",
              "in training epochs (fit + each epoch's validation, checkpoint, run file)",
              "in runs before the first epoch (shard read, model build; in `hpcdl train` "
              "jobs also imports and MPI start)",
              "outside runs (process start, imports, MPI init, test evaluation, storage)",
              "outside training epochs %", "outside Keras fit %"]]
    quantities = ("job", "fit", "epochs", "setup", "outside_runs", "outside_epochs", "outside_fit")
    rules = sorted(runs[0], key=lambda rule: (rule == "all", -runs[0][rule]["job"]))
    for rule in rules:
        table.append([rule, *(summary([part(times[rule], q) for times in runs])
                              for q in quantities)])
    append_results(
        "7. Pipeline overhead of the local demo sweep",
        table,
        f"`{config_path}` run from scratch {reps} times (`snakemake --profile profiles/local`): "
        f"wall time {summary(walls)} min for {summary(trial_epochs)} trial epochs; "
        f"15-min load average at each sweep's end {summary(loads)} (2 is this machine's "
        "cores fully used by the sweep alone). "
        "Job seconds: Snakemake's `benchmark:` record of each job (summed over the workers, "
        "which run concurrently); snakemake: the sweep's wall time during which no job ran "
        "(Snakemake's start-up, DAG, scheduling, the sweep_config local rule). From every run "
        "file the jobs wrote (rank 0's clock): in Keras fit, the `epoch_seconds` (graph tracing "
        "of each run's first epoch included); in training epochs, from the first epoch's start "
        "to the last epoch's end (`elapsed_seconds`), i.e. fit plus the validation, checkpoint "
        "and run-file write of every epoch but the first's, as benchmark 1 counts an epoch; "
        "before the first epoch, from entering `hpcdl.train.train` to the first epoch's start "
        "(and its validation). Outside runs: the job's remainder. Goal: outside training "
        "epochs < 15 %.")


if __name__ == "__main__":
    main()
