"""Serves forecasts from the latest trained model, in the API process.

The model is loaded once and reloaded when a new version lands (`latest.json` changes);
a forecast rolls it forward from the most recent metrics.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from jobs.api.history import MachineHistory
from jobs.settings import HISTORY_SAMPLE_S
from runners import forecast

TRAIN = ('POST /api/jobs with {"kind": "train"}, or the dashboard\'s Train button')


class NoForecast(Exception):
    """No forecast can be made now: a 409 that says why."""


class NoRecentSamples(NoForecast):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"no sample of the machine in the last {seconds:g} s to forecast from: the "
            "supervisor records one a second; is it running (offload status)?")


class NoModel(NoForecast):
    def __init__(self, damaged: bool = False) -> None:
        super().__init__(
            f"the forecasting model ({forecast.MODELS_DIR}/{forecast.LATEST}, or the file it "
            f"names) cannot be read: train one again ({TRAIN})" if damaged else
            f"no forecasting model yet: train one first ({TRAIN})")


class Predictor:
    def __init__(self, data_dir: Path, history: MachineHistory) -> None:
        self.data_dir = data_dir
        self.history = history
        self._pointer = data_dir / forecast.MODELS_DIR / forecast.LATEST
        self._seen: tuple[int, int] | None = None
        self._model: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def model(self) -> dict[str, Any]:
        with self._lock:
            try:
                st = os.stat(self._pointer)
                seen = (st.st_ino, st.st_mtime_ns)
            except OSError:
                seen = None
            if seen != self._seen:
                model = forecast.load_latest(str(self.data_dir)) if seen else None
                self._model = model if _usable(model) else None
                self._seen = seen
            if self._model is None:
                raise NoModel(damaged=seen is not None)
            return self._model

    def version(self) -> int | None:
        """The latest usable model's version; None while there is none."""
        try:
            version = self.model().get("version")
        except NoModel:
            return None
        return version if isinstance(version, int) else None

    def predict(self, horizon: int) -> dict[str, Any]:
        model = self.model()
        lags = int(model["lags"])
        samples = self.history.read((lags + 5) * HISTORY_SAMPLE_S)
        if not samples:  # else the model's mean, said as the machine's forecast
            raise NoRecentSamples((lags + 5) * HISTORY_SAMPLE_S)
        recent = {name: [float(s[name]) for s in samples] for name in forecast.SERIES}
        values = forecast.predict(model, recent, horizon)
        last_t = samples[-1]["t"] if samples else None
        return {"version": model.get("version"), "horizon": horizon,
                "interval_s": HISTORY_SAMPLE_S, "from_t": last_t, **values}


def _usable(model: Any) -> bool:
    """Whether `model` forecasts (one step from nothing): a file edited or damaged by
    hand, or not a model at all, is said as such, never a 500."""
    if not isinstance(model, dict):
        return False
    try:
        forecast.predict(model, {name: [] for name in forecast.SERIES}, 1)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return False
    return True
