"""Serves forecasts from the latest trained model, in the API process.

The model is loaded once and reloaded when a new version lands (`latest.json` changes);
a forecast rolls it forward from the most recent metrics.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from jobs.api.history import MetricsReader
from jobs.settings import HISTORY_SAMPLE_S
from runners import forecast


class NoModel(Exception):
    def __init__(self) -> None:
        super().__init__("no forecasting model yet: train one first (POST /api/jobs with "
                         '{"kind": "train"}, or the dashboard\'s Train button)')


class Predictor:
    def __init__(self, data_dir: Path, metrics: MetricsReader) -> None:
        self.data_dir = data_dir
        self.metrics = metrics
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
                self._model = forecast.load_latest(str(self.data_dir)) if seen else None
                self._seen = seen
            if self._model is None:
                raise NoModel
            return self._model

    def predict(self, horizon: int) -> dict[str, Any]:
        model = self.model()
        lags = int(model["lags"])
        samples = self.metrics.read((lags + 5) * HISTORY_SAMPLE_S)
        recent = {name: [float(s[name]) for s in samples] for name in forecast.SERIES}
        values = forecast.predict(model, recent, horizon)
        last_t = samples[-1]["t"] if samples else None
        return {"version": model.get("version"), "horizon": horizon,
                "interval_s": HISTORY_SAMPLE_S, "from_t": last_t, **values}
