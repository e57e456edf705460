"""Train kind: a forecasting model of the machine metrics the dashboard records.

Input: {"epochs": int (default 60), "lags": int (default 30), "seconds": history
        window to learn from (default all), "learning_rate": float (default 0.05),
        "validation": fraction held out, the most recent (default 0.2)}
Result: training and validation error (RMSE, in percentage points) per series, against
a naive "no change" forecast, and the model's version.

    python -m runners.train --job-file var/jobs/<id>/job.json
    python -m runners.train [--epochs N] [--lags N] [--learning-rate R] [--data-dir var]
"""

from __future__ import annotations

import math
import os
import sys

from jobs import protocol as p
from runners import base

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    import numpy as np

MIN_SAMPLES = 60
BATCH = 64
# A model whose error on a series of percentages passes this many points (1e13 was seen)
# blew up short of NaN: its forecasts would swing between 0 and 100 %. Not against the
# naive forecast: after a busy spell that ended, a sound model is far behind it a while.
BLOWN_UP_RMSE = 100.0
# Each option's (default, lowest, highest): checked here and, before a job is created, by
# the API's TrainInput (jobs/inputs.py), which is built from these.
EPOCHS = (60, 1, 10_000)
LAGS = (30, 1, 600)
SECONDS = (0, 0, 10**7)  # learn from the last N seconds of history; 0: all of it
LEARNING_RATE = (0.05, 1e-6, 1.0)
VALIDATION = (0.2, 0.05, 0.5)  # the most recent fraction, held out


def samples_needed(lags: int) -> int:
    """The fewest recorded samples a training run with `lags` learns from."""
    return max(MIN_SAMPLES, lags * 3)


def execute(job: base.Job) -> dict[str, Any]:
    import numpy as np  # the one heavy import, and only this kind pays for it

    from runners import forecast

    options = _options(job.input)
    data_dir = job.data_dir or str(job.input.get("data_dir") or "var")
    try:
        samples = forecast.load_samples(data_dir)
    except OSError as exc:  # a folder where the history goes, a data folder that is a file
        raise base.RunnerError(
            f"cannot read the history at {p.metrics_file(data_dir)} "
            f"({exc.strerror or exc}): is {data_dir!r} Offload's data folder (--data-dir, "
            "OFFLOAD_DATA_DIR)?") from exc
    recorded = len(samples)
    if options["seconds"]:
        cutoff = samples[-1]["t"] - options["seconds"] if samples else 0
        samples = [s for s in samples if s["t"] >= cutoff]
    lags = options["lags"]
    if not samples and not os.path.isdir(os.path.join(data_dir, "jobs")):
        # No Offload ever ran on it (a --data-dir elsewhere); a new one's comes within a second.
        raise base.RunnerError(
            f"no history to learn from at {p.metrics_file(data_dir)}: is {data_dir!r} "
            "Offload's data folder (--data-dir, OFFLOAD_DATA_DIR; on a Ray node, "
            "OFFLOAD_DATA_DIR where `ray start` runs)? The dashboard records a sample a "
            "second there")
    if len(samples) < samples_needed(lags):
        if recorded >= samples_needed(lags):  # there is enough: 'seconds' left it out
            raise base.RunnerError(
                f"'seconds' ({options['seconds']:g}) keeps {len(samples)} of the {recorded} "
                f"samples recorded, and this training needs at least {samples_needed(lags)} "
                "(about one a second): raise 'seconds', or leave it out to learn from all")
        lower = ", or lower 'lags'" if len(samples) >= MIN_SAMPLES else ""
        raise base.RunnerError(
            f"not enough history to learn from yet: {len(samples)} samples, need at least "
            f"{samples_needed(lags)} (about one a second); let the dashboard run a "
            f"few minutes{lower}")
    series = {name: np.asarray([s[name] for s in samples], dtype=float)
              for name in forecast.SERIES}
    model: dict[str, Any] = {"kind": "autoregressive-linear", "lags": lags,
                             "trained_on": len(samples), "series": {}}
    scores: dict[str, Any] = {}
    fits = {name: _Fit(values, lags, options["validation"]) for name, values in series.items()}
    epochs = options["epochs"]
    rng = np.random.default_rng(0)
    job.data["loss_curve"] = []  # this attempt's: a retry's job file holds the last one's
    for epoch in range(1, epochs + 1):
        losses = [fit.epoch(options["learning_rate"], rng) for fit in fits.values()]
        if not math.isfinite(sum(losses)):  # a NaN model would replace the good one
            raise base.RunnerError(
                f"training diverged at epoch {epoch} (its loss is no longer a number): "
                f"lower 'learning_rate' (it was {options['learning_rate']})")
        job.progress(epoch / epochs, f"epoch {epoch}/{epochs} loss {sum(losses) / 2:.4g}",
                     {"loss_curve": [*job.data["loss_curve"], round(sum(losses) / 2, 5)]})
    for name, fit in fits.items():
        model["series"][name] = fit.params()
        scores[name] = fit.scores()
    for name, score in scores.items():
        worst = max(score["train_rmse"], score["validation_rmse"])  # NaN: no validation
        if worst > BLOWN_UP_RMSE:
            raise base.RunnerError(
                f"training blew up: {name}'s RMSE is {worst:.4g} points (a naive \"no "
                f"change\" forecast's: {score['naive_validation_rmse']:.4g}), so this model "
                "is not published (the one before stays): lower 'learning_rate' (it was "
                f"{options['learning_rate']})")
    try:
        version = forecast.save(data_dir, model)
    except OSError as exc:
        full = exc.errno in p.DISK_FULL
        raise base.RunnerError(
            f"cannot save the model in {forecast.models_dir(data_dir)} "
            f"({exc.strerror or exc}): "
            f"{'free some space on its disk' if full else 'make it writable'}, then train "
            "again; the model before, if any, stays in use") from exc
    return {"version": version, "samples": len(samples), "lags": lags, "epochs": epochs,
            "error": scores}


class _Fit:
    """One series: standardise, window, fit weights by mini-batch gradient descent."""

    def __init__(self, values: np.ndarray, lags: int, validation: float) -> None:
        import numpy as np

        from runners import forecast

        self.np = np
        self.mean = float(values.mean())
        self.std = float(values.std()) or 1.0
        x, y = forecast.windows((values - self.mean) / self.std, lags)
        split = int(len(y) * (1 - validation))
        self.x_train, self.y_train = x[:split], y[:split]
        self.x_val, self.y_val = x[split:], y[split:]
        self.weights = np.zeros(lags + 1)
        self.weights[lags - 1] = 1.0  # start from "tomorrow is like today"

    def epoch(self, rate: float, rng: Any) -> float:
        np = self.np
        order = rng.permutation(len(self.y_train))
        # A diverging fit overflows: its loss is no number, which the caller says, without
        # numpy's warnings (and its source lines) in the job's output before it.
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, len(order), BATCH):
                batch = order[start:start + BATCH]
                x, y = self.x_train[batch], self.y_train[batch]
                error = x @ self.weights[:-1] + self.weights[-1] - y
                grad = np.append(x.T @ error, error.sum()) / len(batch)
                self.weights -= rate * grad
            return float(np.mean((self._predict(self.x_train) - self.y_train) ** 2))

    def _predict(self, x: np.ndarray) -> np.ndarray:
        predicted: np.ndarray = x @ self.weights[:-1] + self.weights[-1]
        return predicted

    def _rmse(self, x: np.ndarray, y: np.ndarray) -> float:
        if len(y) == 0:
            return float("nan")
        return float(self.np.sqrt(self.np.mean((self._predict(x) - y) ** 2)) * self.std)

    def scores(self) -> dict[str, float]:
        naive = self.np.sqrt(self.np.mean((self.x_val[:, -1] - self.y_val) ** 2)) * self.std
        return {"train_rmse": round(self._rmse(self.x_train, self.y_train), 4),
                "validation_rmse": round(self._rmse(self.x_val, self.y_val), 4),
                "naive_validation_rmse": round(float(naive), 4)}

    def params(self) -> dict[str, Any]:
        return {"weights": [float(w) for w in self.weights], "mean": self.mean, "std": self.std}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    return {"epochs": int(base.number(options, "epochs", EPOCHS, whole=True)),
            "lags": int(base.number(options, "lags", LAGS, whole=True)),
            "seconds": base.number(options, "seconds", SECONDS),
            "learning_rate": base.number(options, "learning_rate", LEARNING_RATE),
            "validation": base.number(options, "validation", VALIDATION)}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=EPOCHS[0])
    parser.add_argument("--lags", type=int, default=LAGS[0])
    parser.add_argument("--seconds", type=float, default=0, help="learn from the last N s")
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE[0])
    parser.add_argument("--validation", type=float, default=VALIDATION[0],
                        help="the most recent fraction of the history, held out to score "
                             f"the model (default: {VALIDATION[0]:g})")
    parser.add_argument("--data-dir", default=os.environ.get("OFFLOAD_DATA_DIR", "var"),
                        help="Offload's data folder (its history/metrics.jsonl)")


def _direct_input(args: argparse.Namespace) -> dict[str, Any]:
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise ValueError(f"--data-dir {args.data_dir} is no folder: give Offload's data "
                         "folder (its history/metrics.jsonl)")
    job_input = {"epochs": args.epochs, "lags": args.lags, "seconds": args.seconds,
                 "learning_rate": args.learning_rate, "validation": args.validation,
                 "data_dir": args.data_dir}
    _options(job_input)  # out of bounds: bad usage, as the API's 422
    return job_input


def main(argv: list[str] | None = None) -> int:
    return base.main("train", execute, _add_arguments, _direct_input, argv)


if __name__ == "__main__":
    sys.exit(main())
