"""The forecasting model of the machine metrics: shared by the training runner and the
API's /api/predict. Standard library plus numpy.

An autoregressive linear model per series (CPU %, memory %): the next sample from the
last `lags` samples, fitted by mini-batch gradient descent on standardised data so that
training reports a loss per epoch. Models are JSON files, versioned and written
atomically: `<data>/models/forecast-v<N>.json`, then `latest.json` points at it. A new
model is only pointed at once it is whole, so a cancelled training never replaces a
good model with a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import Any

import numpy as np

from jobs import protocol as p

SERIES = ("cpu", "mem")
EXTRA_FIELDS = ("mem_used_mb",)  # kept where a line has it; any other field is left out
# A sample's line is about 70 bytes: a longer one was written by hand, and is left out.
MAX_SAMPLE_LINE = 1024
READ_CHUNK = 1 << 20  # how much of the file a reader takes at a time
MODELS_DIR = "models"
LATEST = "latest.json"


def models_dir(data_dir: str) -> str:
    return os.path.join(data_dir, MODELS_DIR)


def load_samples(data_dir: str) -> list[dict[str, float]]:
    path = p.metrics_file(data_dir)
    samples = []
    try:
        with open(path, "rb") as f:  # a line that is no UTF-8 is damaged, as a torn one
            while line := f.readline(MAX_SAMPLE_LINE + 1):
                if not line.endswith(b"\n") and len(line) > MAX_SAMPLE_LINE:
                    # too long for a sample: its rest is read a piece at a time, not kept
                    while (rest := f.readline(READ_CHUNK)) and not rest.endswith(b"\n"):
                        pass
                    continue
                sample = sample_of(line.removesuffix(b"\n"))
                if sample is not None:
                    samples.append(sample)
    except FileNotFoundError:
        pass
    return samples


def sample_of(line: bytes) -> dict[str, float] | None:
    """A line of the history as a sample: its time and series, each a finite number, and
    its known extra fields that are; None for a line torn by a crash, with a byte that is
    no UTF-8, or edited by hand (the training's and the API's readers both leave it out:
    one edited to "cpu": "abc" failed every chat)."""
    if len(line) > MAX_SAMPLE_LINE:
        return None
    try:
        found = json.loads(line)
    except ValueError:
        return None
    if not isinstance(found, dict) or not all(_finite(found.get(k)) for k in ("t", *SERIES)):
        return None
    return {k: float(found[k]) for k in ("t", *SERIES, *EXTRA_FIELDS) if _finite(found.get(k))}


def _finite(value: object) -> bool:
    """A number, finite: not a string, a flag, NaN or infinite (compared, not
    math.isfinite: an int too large for a float, 10**400, is none either)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and abs(value) <= sys.float_info.max)


def windows(values: np.ndarray, lags: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `lags` consecutive values, and the value after each."""
    x = np.lib.stride_tricks.sliding_window_view(values[:-1], lags)
    return x, values[lags:]


def check(model: dict[str, Any]) -> int:
    """The model's `lags`, once its numbers are all there and finite, `lags + 1` weights
    a series; else ValueError. Before anything is sized by `lags`: a file edited by hand
    to lags 10^9 had the API allocate gigabytes, and a NaN in it forecast zeros."""
    lags = model["lags"]
    if isinstance(lags, float) and lags.is_integer():
        lags = int(lags)
    if isinstance(lags, bool) or not isinstance(lags, int) or lags < 1:
        raise ValueError(f"lags is {lags!r}, not a whole number of at least 1")
    for name in SERIES:
        params = model["series"][name]
        weights = params["weights"]
        if not isinstance(weights, list) or len(weights) != lags + 1:
            raise ValueError(f"{name} has no list of lags + 1 = {lags + 1} weights")
        numbers = [*weights, params["mean"], params["std"]]
        if not all(_finite(x) for x in numbers) or params["std"] <= 0:
            raise ValueError(f"{name} has a weight, mean or std that is no finite float, "
                             "or a std not above 0")
    return lags


def predict(model: dict[str, Any], recent: dict[str, list[float]], horizon: int
            ) -> dict[str, list[float]]:
    """Roll the model forward `horizon` steps from the most recent samples."""
    lags = check(model)
    out: dict[str, list[float]] = {}
    for name in SERIES:
        params = model["series"][name]
        weights = np.asarray(params["weights"])
        mean, std = float(params["mean"]), float(params["std"])
        window = list((np.asarray(recent[name][-lags:], dtype=float) - mean) / std)
        if len(window) < lags:
            window = [0.0] * (lags - len(window)) + window
        values = []
        for _ in range(horizon):
            nxt = float(np.dot(weights[:-1], window[-lags:]) + weights[-1])
            window.append(nxt)
            values.append(min(100.0, max(0.0, nxt * std + mean)))
        out[name] = values
    return out


def save(data_dir: str, model: dict[str, Any]) -> int:
    """Write the model as the next version, then point `latest.json` at it."""
    folder = models_dir(data_dir)
    os.makedirs(folder, exist_ok=True)
    _remove_abandoned_claims(folder)
    # Past every version on disk too: below one (the pointer set back, say), this model
    # would be saved and the older one, numbered higher, pointed at.
    version = max([latest_version(data_dir), *_versions(folder)]) + 1
    while True:  # claimed by creating it: two trainings saving at once took the same one
        try:
            os.close(os.open(os.path.join(folder, _file(version)),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            version += 1
    path = os.path.join(folder, _file(version))
    try:
        p.write_json(path, {**model, "version": version})
    except BaseException:  # a full disk, a stop: the claim, still empty, is no model to keep
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:  # once whole, another training may point at it
                os.unlink(path)
        raise
    try:
        _point_at_newest(folder, version)
    except OSError:
        # No room for the pointer: a model no reader finds, whose version the next training
        # would skip, taking the room that is short. Unless another training's pointer
        # reaches it (two trainings at once), it goes: the training failed.
        if latest_version(data_dir) < version:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    return version


# A claim is written within moments of being made: one left empty this long, below a whole
# model, was made by a training killed before it wrote its model.
ABANDONED_CLAIM_S = 60.0


def _remove_abandoned_claims(folder: str) -> None:
    """Delete the empty model files of trainings killed between their claim and its write.
    Only those below the newest whole model: a claim is taken above the version
    `latest.json` names, so a training merely slow to write one of them (stopped, on a slow
    disk) can take no other's version, where one removed above would be claimed again."""
    versions = sorted((int(found[1]) for name in os.listdir(folder)
                       if (found := _VERSIONED.fullmatch(name))), reverse=True)
    newest_whole = next((each for each in versions if
                         p.read_json_or_none(os.path.join(folder, _file(each))) is not None), 0)
    for version in versions:
        if version >= newest_whole:
            continue
        path = os.path.join(folder, _file(version))
        with contextlib.suppress(OSError):  # gone meanwhile: removed by another training
            st = os.stat(path)
            if st.st_size == 0 and time.time() - st.st_mtime > ABANDONED_CLAIM_S:
                os.unlink(path)


_VERSIONED = re.compile(r"forecast-v(\d+)\.json")  # a model's file, as _file names it


def _file(version: int) -> str:
    return f"forecast-v{version}.json"


def _point_at_newest(folder: str, version: int) -> None:
    """Point `latest.json` at the newest whole model from `version` on, until no newer one
    is whole: one saved at once by another training, pointed at it before this one wrote
    its older pointer, is pointed at again."""
    pointed = 0
    while True:
        newer = sorted(_versions(folder), reverse=True)
        # Claimed but not yet written (empty): its training points at it once it is whole.
        newest = next((each for each in newer if each >= version and
                       p.read_json_or_none(os.path.join(folder, _file(each))) is not None),
                      version)
        if newest <= pointed:
            return
        p.write_json(os.path.join(folder, LATEST), {"version": newest, "file": _file(newest)})
        pointed = newest


def _versions(folder: str) -> list[int]:
    """The versions of the model files in `folder` (claimed or whole)."""
    return [int(found[1]) for name in os.listdir(folder) if (found := _VERSIONED.fullmatch(name))]


def latest_version(data_dir: str) -> int:
    """The version `latest.json` points at; 0 if none, or if it is damaged (edited to a
    version that is no whole number)."""
    pointer = p.read_json_or_none(os.path.join(models_dir(data_dir), LATEST))
    version = pointer.get("version") if pointer else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def load_latest(data_dir: str) -> dict[str, Any] | None:
    pointer = p.read_json_or_none(os.path.join(models_dir(data_dir), LATEST))
    if not pointer:
        return None
    return p.read_json_or_none(os.path.join(models_dir(data_dir), str(pointer.get("file"))))
