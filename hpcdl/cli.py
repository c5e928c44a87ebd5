"""The `hpcdl` command: parses arguments and calls the module that does the work."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hpcdl import __version__, logs
from hpcdl.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

log = logging.getLogger("hpcdl")
# the commands that load TensorFlow: loaded first, without its known start-up noise
TENSORFLOW_COMMANDS = frozenset({"doctor", "train", "worker", "final"})


def cmd_doctor(args: argparse.Namespace) -> int:
    from hpcdl import doctor

    checks = doctor.run_checks()
    if args.json:
        print(json.dumps(doctor.as_dict(checks), indent=2))
    else:
        doctor.print_report(checks)
    return 0 if doctor.all_required_ok(checks) else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    from hpcdl import config, data

    out = Path(args.out) if args.out else None
    if args.config:
        cfg = config.load(args.config, args.set)
        section = cfg.section("dataset")
        section["allow_nonfinite"] |= args.allow_nonfinite
        request = data.PrepareRequest.from_config(section, out or cfg.dataset_file)
    elif args.dataset:
        options = data.SourceOptions(
            source=args.source, x_key=args.x_key, y_key=args.y_key, x_test_key=args.x_test_key,
            y_test_key=args.y_test_key, test_fraction=args.test_fraction, seed=args.seed,
            allow_nonfinite=args.allow_nonfinite)
        write = data.WriteOptions(args.compression, args.compression_level, args.chunk_mb)
        request = data.PrepareRequest(args.dataset, options, args.val_fraction, out, write)
    else:
        raise UserError(
            "give a DATASET (fashion_mnist, mnist, digits, npz:FILE, hdf5:FILE) or --config CFG"
        )
    print(data.prepare(request, force=args.force))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hpcdl import config, train

    cfg = config.load(args.config, args.set)
    out = Path(args.out) if args.out else cfg.paths.run_file(cfg.name)
    result = train.train(cfg, out)
    if result.stop_reason == train.StopReason.INTERRUPTED:
        return EXIT_INTERRUPTED
    if result.stop_reason.failed:
        log.error("%s: run failed (%s) at epoch %d", out, result.stop_reason, result.n_epochs)
        return EXIT_FAILED
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from hpcdl import config, study, worker

    # the environment reaches the workers that Snakemake or sbatch start for the user
    continue_changed = args.continue_changed or os.environ.get(study.CONTINUE_CHANGED_ENV) == "1"
    outcome = worker.Worker(config.load(args.config, args.set), args.worker_id,
                            continue_changed=continue_changed).run()
    return {worker.WorkerOutcome.INTERRUPTED: EXIT_INTERRUPTED,
            worker.WorkerOutcome.FAILED: EXIT_FAILED}.get(outcome, 0)


def cmd_storage_serve(args: argparse.Namespace) -> int:
    from hpcdl import config, study

    cfg = config.load(args.config, args.set)
    backend, served = study.proxy_backend(cfg, args.backend, args.force_journal)
    port = study.grpc_port(cfg, args.port)
    log.info(
        "serving %s (study %s) on %s:%d for grpc:// workers; Ctrl-C stops",
        served,
        cfg.name,
        args.host,
        port,
    )
    study.serve_grpc_proxy(backend, args.host, port)
    return 0


def cmd_final(args: argparse.Namespace) -> int:
    from hpcdl import config, train, worker

    result = worker.retrain_best(config.load(args.config, args.set))
    return EXIT_INTERRUPTED if result.stop_reason == train.StopReason.INTERRUPTED else 0


def cmd_submit(args: argparse.Namespace) -> int:
    from hpcdl import config, submit

    cfg = config.load(args.config, args.set)
    cfg.check_site(apptainer=args.apptainer, slurm=True)
    container = cfg.section("resources")["container"] if args.apptainer else None
    if args.dry_run:
        print(submit.preview(cfg, container))
        return 0
    for job, job_id in submit.submit(cfg, container).items():
        print(f"{job}: {job_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hpcdl import config, status

    cfg = config.load(args.config, args.set)
    if args.json:
        print(status.as_json(cfg))
    elif args.follow:
        # piped in (make demo): Snakemake's output, printed above the line until it ends
        piped = sys.stdin.buffer if stat.S_ISFIFO(os.fstat(0).st_mode) else None
        status.follow(cfg, args.every, piped)
    elif args.watch:
        status.watch(cfg, args.every)
    else:
        status.show(cfg)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from hpcdl import config, status

    status.dashboard(config.load(args.config, args.set), args.host, args.port)
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from hpcdl import config, scaling, study

    cfg = config.load(args.config, args.set)
    best = study.best_trial(cfg)
    log.info("scaling the params of trial %d: %s", best.number, best.params)
    print(scaling.measure(cfg, best.params, args.launcher, args.rank_exec))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from hpcdl import config, report

    h5, csv = report.aggregate(config.load(args.config, args.set))
    print(f"{h5}\n{csv}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpcdl import config, report

    print(report.report(config.load(args.config, args.set)))
    return 0


def sweep_command(sub: Any, name: str, func: Callable[[argparse.Namespace], int], text: str,
                  config_required: bool = True) -> argparse.ArgumentParser:
    """A subcommand that works on one sweep: --config CFG and any --set KEY=VALUE."""
    parser = sub.add_parser(name, help=text)
    parser.add_argument("--config", required=config_required, help="sweep config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 --set width=128")
    parser.set_defaults(func=func)
    return parser


def add_prepare_command(sub: Any) -> None:
    """`hpcdl prepare`: a dataset by name or file, with the options of its source."""
    prepare = sweep_command(sub, "prepare", cmd_prepare, "write a dataset HDF5 file (from "
                            "DATASET, or from a config's dataset section)", config_required=False)
    prepare.add_argument("dataset", nargs="?",
                         help="fashion_mnist | mnist | digits | npz:FILE | hdf5:FILE")
    prepare.add_argument("--out", help="output .h5 (default results/data/<name>.h5)")
    prepare.add_argument("--source", help="directory of the IDX files, or 'keras' to download")
    prepare.add_argument("--val-fraction", type=float, default=0.1,
                         help="share of train held out for validation, stratified (default 0.1)")
    prepare.add_argument("--test-fraction", type=float, default=0.2,
                         help="share held out as test when the source has no test split")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the splits (default 0)")
    prepare.add_argument("--x-key", default="x", help="images array in npz/hdf5 (default x)")
    prepare.add_argument("--y-key", default="y", help="labels array in npz/hdf5 (default y)")
    prepare.add_argument("--x-test-key", default="x_test", help="test images, if present")
    prepare.add_argument("--y-test-key", default="y_test", help="test labels, if present")
    prepare.add_argument("--force", action="store_true", help="overwrite an existing output")
    prepare.add_argument("--compression", choices=("gzip", "lzf", "none"), default="none",
                         help="filter of the images (default none: benchmark 8; gzip for "
                         "1.75x smaller files, sparse images much more)")
    prepare.add_argument("--compression-level", type=int, choices=range(1, 10), default=4,
                         metavar="1..9", help="gzip level (default 4)")
    prepare.add_argument("--chunk-mb", type=float, default=1.0,
                         help="MiB of images per chunk, whole rows (default 1)")
    prepare.add_argument("--allow-nonfinite", action="store_true",
                         help="keep NaN/inf values in npz/hdf5 images (refused by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcdl", description="Hyperparameter sweeps of Horovod data-parallel Keras "
        "training on HPC clusters, from one YAML config. See README.md.")
    parser.add_argument("--version", action="version", version=f"hpcdl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="check the stack: TF, Keras, Horovod, MPI, Slurm, GPUs")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=cmd_doctor)

    add_prepare_command(sub)

    train = sweep_command(sub, "train", cmd_train,
                          "one data-parallel training run (under mpirun/srun)")
    train.add_argument("--out", help="run file .h5 (default <results_dir>/runs/<name>.h5); "
                       "an interrupted run with the same --out resumes")

    worker = sweep_command(sub, "worker", cmd_worker, "pull trials from the sweep's study until "
                           "its budget is spent (under mpirun/srun: one worker, many ranks)")
    worker.add_argument("--worker-id", type=int, default=0,
                        help="this worker's index (seeds its sampler; default 0)")
    worker.add_argument("--continue-changed", action="store_true",
                        help="continue the study although the config changed in a way that "
                        "makes old and new trials incomparable (recorded in the study); "
                        "also HPCDL_CONTINUE_CHANGED=1 in the environment")

    sweep_command(sub, "final", cmd_final, "retrain the best trial's params on train+val -> "
                  "<sweep>/best/model.keras and run.h5 (under mpirun/srun)")
    sweep_command(sub, "aggregate", cmd_aggregate, "sweep -> summary.h5 and summary.csv")
    sweep_command(sub, "report", cmd_report, "sweep -> report.html with figures")

    status = sweep_command(sub, "status", cmd_status, "trials complete / running / pruned / "
                           "failed, best so far, budget left")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--follow", action="store_true",
                        help="one live line (finished / pruned / running, best, ETA) until the "
                        "sweep ends; with output piped in (make demo: snakemake 2>&1 | ...), "
                        "that output above the line, until it ends")
    status.add_argument("--every", type=float, default=5.0, help="seconds between refreshes")
    status.add_argument("--json", action="store_true", help="machine-readable snapshot")

    dashboard = sweep_command(sub, "dashboard", cmd_dashboard,
                              "optuna-dashboard on the sweep's study")
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)

    scaling = sweep_command(sub, "scaling", cmd_scaling, "best params at "
                            "resources.scaling_ranks ranks -> <sweep>/scaling.h5")
    scaling.add_argument("--launcher", default="mpirun --allow-run-as-root",
                         help="MPI launcher; '-n R' is appended (in Slurm: 'srun --mpi=pmix')")
    scaling.add_argument("--rank-exec", default="",
                         help="what each rank runs hpcdl through, e.g. 'apptainer exec --nv IMG'")

    submit = sweep_command(sub, "submit", cmd_submit, "the sweep as sbatch scripts (worker job "
                           "array + dependent report job), submitted with sbatch")
    submit.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    submit.add_argument("--apptainer", action="store_true",
                        help="run every step inside resources.container")

    storage = sub.add_parser("storage", help="study storage services")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True)
    serve = sweep_command(storage_sub, "serve", cmd_storage_serve, "Optuna's gRPC storage "
                          "proxy in front of the sweep's storage, for workers on many nodes")
    serve.add_argument("--backend", help="storage URL behind the proxy, e.g. postgresql://... "
                       "(default: SQLite file <sweep>/study.sqlite)")
    serve.add_argument("--force-journal", action="store_true",
                       help="allow --backend journal, which Optuna's proxy does not support "
                       "(optuna#6084)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on")
    serve.add_argument("--port", type=int, help="port (default: from the config's grpc:// URL)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user mistakes become one line on stderr and exit code 2."""
    logs.configure()
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.command in TENSORFLOW_COMMANDS:
        from hpcdl import quiet

        quiet.import_tensorflow()
    try:
        return func(args)
    except UserError as exc:
        # one write: print() writes the text and its newline apart, and the ranks of a job
        # share one log, where another rank's line could land between the two
        sys.stderr.write(f"hpcdl {args.command}: error: {exc}\n")
        return EXIT_USER_ERROR
    except Exception:
        log.exception("hpcdl %s: unexpected error", args.command)
        from hpcdl import parallel

        parallel.abort_job(EXIT_FAILED)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
