"""Benchmark 9, KerasTuner side: the job with KerasTuner's Hyperband tuner (max_epochs = the
job's epochs, factor 3, one Hyperband iteration: its own budget, not a trial count), objective
val_accuracy, its defaults otherwise (best-epoch weights saved per trial).

--workers N > 1 runs KerasTuner's distributed mode as its guide describes: one chief process
(the oracle, a gRPC service) and N worker processes, told apart by KERASTUNER_TUNER_ID.

    benchmarks/.venv-kt/bin/python benchmarks/peers/run_kt.py --dataset D --events E ...
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: argparse.Namespace) -> None:
    """Chief + workers, each this script with KerasTuner's three variables; fail if one does."""
    port = str(free_port())
    ids = ["chief", *(f"tuner{i}" for i in range(args.workers))]
    procs = []
    for tuner_id in ids:
        env = {**os.environ, "KERASTUNER_TUNER_ID": tuner_id,
               "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *sys.argv, "--workers", "1"], env=env))
    pairs = list(zip(ids, procs, strict=True))
    codes = {tuner_id: proc.wait() for tuner_id, proc in reversed(pairs)}
    if any(codes.values()):
        sys.exit(f"KerasTuner distributed run failed: exit codes {codes}")


def search(args: argparse.Namespace) -> None:
    """This process's part of the search (the whole search when not distributed)."""
    import tf_keras

    # KerasTuner uses Keras 3 whenever `import keras` gives it Keras 3 (TensorFlow 2.18 installs
    # it); hpcdl trains with Keras 2 (tf-keras, stack.md), so here `keras` is tf-keras.
    sys.modules["keras"] = tf_keras
    import keras_tuner

    job.limit_threads()
    dataset = Path(args.dataset)
    (x, y), val, test = (job.load(dataset, split) for split in ("train", "val", "test"))
    n_classes = int(y.max()) + 1

    class HyperMLP(keras_tuner.HyperModel):
        """hpcdl's MLP over the demo's space; a trial that trains to the full budget is then
        tested (KerasTuner's documented place for custom training: HyperModel.fit)."""

        def build(self, hp: Any) -> Any:
            (w_lo, w_hi), (d_lo, d_hi) = job.SPACE["width"], job.SPACE["depth"]
            params = {
                "width": hp.Int("width", w_lo, w_hi, sampling="log"),
                "depth": hp.Int("depth", d_lo, d_hi),
                "learning_rate": hp.Float("learning_rate", *job.SPACE["learning_rate"],
                                          sampling="log"),
                "dropout": hp.Float("dropout", *job.SPACE["dropout"]),
            }
            return job.build(params, x.shape[1:], n_classes)

        def fit(self, hp: Any, model: Any, *fit_args: Any, **fit_kwargs: Any) -> Any:
            # after fit, not in a callback: evaluate() inside fit's on_train_end empties the
            # History that fit returns and KerasTuner reads (every trial then fails)
            history = model.fit(*fit_args, **fit_kwargs)
            logger = next(c for c in fit_kwargs["callbacks"] if hasattr(c, "events"))
            if logger.last_epoch == args.epochs:
                job.record_test(model, test, logger.events, args.epochs)
            return history

    class Tuner(keras_tuner.Hyperband):
        """KerasTuner's Hyperband plus benchmark 9's per-epoch event line (the trial's id)."""

        def run_trial(self, trial: Any, *fit_args: Any, **fit_kwargs: Any) -> Any:
            logger = job.epoch_logger(job.Events(args.events, f"kt-{trial.trial_id}"))
            fit_kwargs["callbacks"] = [*fit_kwargs.get("callbacks", []), logger]
            return super().run_trial(trial, *fit_args, **fit_kwargs)

    tuner = Tuner(HyperMLP(), objective="val_accuracy", max_epochs=args.epochs, factor=3,
                  seed=args.seed, directory=args.directory, project_name=f"seed{args.seed}")
    tuner.search(x, y, validation_data=val, batch_size=job.BATCH_SIZE, verbose=0)
    if os.environ.get("KERASTUNER_TUNER_ID", "chief") == "chief":
        print("best", tuner.get_best_hyperparameters(1)[0].values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--directory", required=True, help="KerasTuner's project directory")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.workers > 1 and "KERASTUNER_TUNER_ID" not in os.environ:
        launch(args)
    else:
        search(args)


if __name__ == "__main__":
    main()
