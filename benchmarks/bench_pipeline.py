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
    epoch_seconds = {"worker": 0.0, "final": 0.0, "scaling": 0.0}
    for path in run_files:
        record = store.read_run(path)
        rule = "worker" if path.parent.name == "trials" else (
            "final" if path.parent.name == "best" else "scaling")
        # rank-seconds in epochs over ranks = wall seconds in epochs for that job
        epoch_seconds[rule] += sum(record.epochs.get("epoch_seconds", []))
    total_job = sum(job_seconds.values())
    # only epochs of jobs Snakemake timed (a scaling run made by hand has no job record)
    total_epochs = sum(seconds for rule, seconds in epoch_seconds.items() if rule in job_seconds)
    table = [["rule", "job seconds", "seconds in training epochs", "outside epochs"]]
    for rule, seconds in sorted(job_seconds.items(), key=lambda kv: -kv[1]):
        inside = epoch_seconds.get(rule, 0.0)
        table.append([rule, f"{seconds:.1f}", f"{inside:.1f}",
                      f"{(1 - inside / seconds) * 100:.0f} %" if seconds else "-"])
    table.append(["all", f"{total_job:.1f}", f"{total_epochs:.1f}",
                  f"{(1 - total_epochs / total_job) * 100:.0f} %"])
    append_results(
        "7. Pipeline overhead of the local demo sweep",
        table,
        "Job seconds: Snakemake's `benchmark:` record of each job (summed over the workers, "
        "which run concurrently). Seconds in training epochs: the `epoch_seconds` (Keras fit "
        "time) of every run file the jobs wrote. The rest is process start-up and TensorFlow "
        "import, graph tracing in each trial's first epoch... (counted inside), validation "
        "passes, checkpoints, storage calls, Snakemake and the report. Goal: < 15 %.")


if __name__ == "__main__":
    main()
