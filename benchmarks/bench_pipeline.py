"""Benchmark 7: how much of the local demo sweep's time is spent outside training epochs
(process start, TF import, Snakemake, storage, validation, checkpoints, report). Runs the sweep
from scratch `--reps` times with Snakemake's local profile and reads, each time, the Snakemake
benchmark records (`benchmark:` TSVs) and the run files the sweep wrote."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from common import REPO, append_results, run, summary

sys.path.insert(0, str(REPO))
COLUMNS = ("job", "fit", "in_run")  # job seconds, in Keras fit, from entering train to last epoch


def split_times(sweep_dir: Path) -> dict[str, dict[str, float]]:
    """Per Snakemake rule: job seconds, seconds in Keras fit, seconds inside training runs."""
    from hpcdl import store

    times: dict[str, dict[str, float]] = {}
    for tsv in sorted((sweep_dir / "benchmarks").glob("*.tsv")):
        with tsv.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        rule = times.setdefault(tsv.stem.split("-")[0], dict.fromkeys(COLUMNS, 0.0))
        rule["job"] += float(row["s"])
    run_files = [*(sweep_dir / "trials").glob("*.h5"), sweep_dir / "best" / "run.h5",
                 *(sweep_dir / "scaling").glob("*.h5")]
    for path in run_files:
        record = store.read_run(path)
        name = {"trials": "worker", "best": "final"}.get(path.parent.name, "scaling")
        if name not in times:  # only runs of jobs Snakemake timed
            continue
        # rank 0's wall seconds: in Keras fit, and from entering `train` to the last epoch's end
        times[name]["fit"] += sum(record.epochs.get("epoch_seconds", []))
        times[name]["in_run"] += float(record.epochs.get("elapsed_seconds", [0.0])[-1])
    times["all"] = {c: sum(rule[c] for rule in times.values()) for c in COLUMNS}
    return times


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
    runs = []
    for rep in range(reps):
        print(f"bench_pipeline: sweep {rep + 1}/{reps} of {config_path}", flush=True)
        run(["rm", "-rf", str(cfg.sweep_dir)])
        run(["snakemake", "--profile", "profiles/local", "--configfile", config_path])
        runs.append(split_times(cfg.sweep_dir))

    def cell(rule: str, value: str) -> str:
        """Median [min-max] over the sweeps of one quantity of one rule."""
        values = []
        for times in runs:
            t = times[rule]
            values.append({"job": t["job"], "fit": t["fit"], "in_run": t["in_run"] - t["fit"],
                           "outside_runs": t["job"] - t["in_run"],
                           "outside": (1 - t["fit"] / t["job"]) * 100 if t["job"] else 0.0}[value])
        return summary(values)

    table = [["rule", "job seconds", "in training epochs (Keras fit)",
              "in runs, outside fit (shard read, model build, validation, checkpoints, reports)",
              "outside runs (process start, imports, MPI init, storage, teardown)",
              "outside epochs %"]]
    rules = sorted(runs[0], key=lambda rule: (rule == "all", -runs[0][rule]["job"]))
    for rule in rules:
        table.append([rule, *(cell(rule, value) for value in
                              ("job", "fit", "in_run", "outside_runs", "outside"))])
    append_results(
        "7. Pipeline overhead of the local demo sweep",
        table,
        f"`{config_path}` run from scratch {reps} times (`snakemake --profile profiles/local`). "
        "Job seconds: Snakemake's `benchmark:` record of each job (summed over the workers, "
        "which run concurrently). In training epochs: the `epoch_seconds` (Keras fit time, "
        "graph tracing of each run's first epoch included) of every run file the jobs wrote. In "
        "runs: each run file's last `elapsed_seconds` (rank 0's wall time from entering "
        "`hpcdl.train.train` to the last epoch's end), minus fit time. Outside runs: the job's "
        "remainder. Goal: outside epochs < 15 %.")


if __name__ == "__main__":
    main()
