"""Benchmark 7: how much of the local demo sweep's time is spent outside training epochs
(process start, TF import, Snakemake, storage, validation, checkpoints, report). Reads the
Snakemake benchmark records (`benchmark:` TSVs) and the run files of a finished sweep."""

from __future__ import annotations

import argparse
import csv
import os
import sys

from common import REPO, append_results, run

sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rerun", action="store_true", help="delete the sweep and run it again")
    parser.add_argument("--quick", action="store_true",
                        help="the smoke sweep (configs/smoke.yaml, a minute) instead of the demo")
    args = parser.parse_args()
    if args.quick:
        args.config = "configs/smoke.yaml"
    os.chdir(REPO)  # the sweep's paths, and Snakemake's, are relative to the repository
    from hpcdl import config, store

    cfg = config.load(REPO / args.config)
    if args.rerun or not (cfg.sweep_dir / "report.html").exists():
        run(["rm", "-rf", str(cfg.sweep_dir)])
        run(["snakemake", "--profile", "profiles/local", "--configfile", args.config])
    job_seconds: dict[str, float] = {}
    for tsv in sorted((cfg.sweep_dir / "benchmarks").glob("*.tsv")):
        with tsv.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        rule = tsv.stem.split("-")[0]
        job_seconds[rule] = job_seconds.get(rule, 0.0) + float(row["s"])
    run_files = [*(cfg.sweep_dir / "trials").glob("*.h5"), cfg.sweep_dir / "best" / "run.h5",
                 *(cfg.sweep_dir / "scaling").glob("*.h5")]
    fit_seconds = {"worker": 0.0, "final": 0.0, "scaling": 0.0}
    run_seconds = dict(fit_seconds)
    for path in run_files:
        record = store.read_run(path)
        rule = "worker" if path.parent.name == "trials" else (
            "final" if path.parent.name == "best" else "scaling")
        # rank 0's wall seconds: in Keras fit, and from entering `train` to the last epoch's end
        fit_seconds[rule] += sum(record.epochs.get("epoch_seconds", []))
        run_seconds[rule] += float(record.epochs.get("elapsed_seconds", [0.0])[-1])
    table = [["rule", "job seconds", "in training epochs (Keras fit)",
              "in runs, outside fit (shard read, model build, validation, checkpoints, reports)",
              "outside runs (process start, imports, MPI init, storage, teardown)",
              "outside epochs"]]
    totals = [0.0, 0.0, 0.0]
    for rule, seconds in sorted(job_seconds.items(), key=lambda kv: -kv[1]):
        fit, in_run = fit_seconds.get(rule, 0.0), run_seconds.get(rule, 0.0)
        totals = [totals[0] + seconds, totals[1] + fit, totals[2] + in_run]
        table.append([rule, f"{seconds:.1f}", f"{fit:.1f}", f"{in_run - fit:.1f}",
                      f"{seconds - in_run:.1f}",
                      f"{(1 - fit / seconds) * 100:.0f} %" if seconds else "-"])
    # only runs of jobs Snakemake timed (a scaling run made by hand has no job record)
    total_job, total_fit, total_run = totals
    table.append(["all", f"{total_job:.1f}", f"{total_fit:.1f}", f"{total_run - total_fit:.1f}",
                  f"{total_job - total_run:.1f}", f"{(1 - total_fit / total_job) * 100:.0f} %"])
    append_results(
        "7. Pipeline overhead of the local demo sweep",
        table,
        f"`{args.config}`. Job seconds: Snakemake's `benchmark:` record of each job (summed "
        "over the workers, which run concurrently). In training epochs: the `epoch_seconds` "
        "(Keras fit time, graph tracing of each run's first epoch included) of every run file "
        "the jobs wrote. In runs: each run file's last `elapsed_seconds` (rank 0's wall time "
        "from entering `hpcdl.train.train` to the last epoch's end), minus fit time. Outside "
        "runs: the job's remainder. Goal: outside epochs < 15 %.")


if __name__ == "__main__":
    main()
