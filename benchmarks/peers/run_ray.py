"""Benchmark 9, Ray Tune side: the job with OptunaSearch (TPE) and the ASHA scheduler, as Ray's
Keras/Optuna examples set them up, 2 concurrent trials of 1 CPU, Ray's defaults otherwise (ASHA
grace period 1, reduction factor 4; no checkpoints, which ASHA does not need).

    benchmarks/.venv-ray/bin/python benchmarks/peers/run_ray.py --dataset D --events E ...
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import job


def trainable(config: dict[str, Any], dataset: str, events_path: str, epochs: int) -> None:
    """One trial in a Ray worker: hpcdl's model, reported to Tune after every epoch."""
    from ray import tune

    job.limit_threads()
    (x, y), val = job.load(Path(dataset), "train"), job.load(Path(dataset), "val")
    model = job.build(config, x.shape[1:], int(y.max()) + 1)
    events = job.Events(events_path, f"ray-{tune.get_context().get_trial_id()}")
    test = job.load(Path(dataset), "test")

    def report(epoch: int, logs: dict[str, float]) -> None:
        # ASHA stops the trial at the report of its last epoch (max_t): test before it
        if epoch == epochs:
            job.record_test(model, test, events, epochs)
        tune.report({"val_accuracy": float(logs["val_accuracy"])})

    model.fit(x, y, batch_size=job.BATCH_SIZE, epochs=epochs, validation_data=val,
              verbose=0, callbacks=[job.epoch_logger(events, report=report)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--storage", required=True, help="Ray Tune's results directory")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-actors", action="store_true",
                        help="TuneConfig(reuse_actors=True); Ray's default is a new process "
                        "per trial")
    args = parser.parse_args()

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    ray.init(num_cpus=args.concurrent)
    (w_lo, w_hi), (d_lo, d_hi) = job.SPACE["width"], job.SPACE["depth"]
    space = {
        "width": tune.lograndint(w_lo, w_hi + 1),  # upper bound exclusive
        "depth": tune.randint(d_lo, d_hi + 1),
        "learning_rate": tune.loguniform(*job.SPACE["learning_rate"]),
        "dropout": tune.uniform(*job.SPACE["dropout"]),
    }
    train = functools.partial(trainable, dataset=args.dataset, events_path=args.events,
                              epochs=args.epochs)
    tuner = tune.Tuner(
        tune.with_resources(train, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", num_samples=args.trials,
            max_concurrent_trials=args.concurrent, reuse_actors=args.reuse_actors,
            search_alg=OptunaSearch(seed=args.seed),
            scheduler=ASHAScheduler(max_t=args.epochs)),
        run_config=tune.RunConfig(storage_path=str(Path(args.storage).resolve()),
                                  name=f"peers-seed{args.seed}"),
    )
    best = tuner.fit().get_best_result(scope="all")
    print("best", best.config, best.metrics.get("val_accuracy"))


if __name__ == "__main__":
    main()
