"""`/api/predict` latency from a trained model, against `/api/health` in the same run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.api import _free_port, _process
from bench.core import stats


def run(requests: int = 400) -> dict[str, Any]:
    from tests.test_train import record_history

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "var"
        record_history(data)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"OFFLOAD_DATA_DIR": str(data), "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port),
                       "--log-level", "warning"], env, f"{url}/api/health"), \
                httpx.Client(base_url=url, timeout=30) as client:
            job = client.post("/api/jobs", json={"kind": "train",
                                                 "input": {"epochs": 60}}).json()
            while client.get(f"/api/jobs/{job['id']}").json()["state"] != "completed":
                time.sleep(0.1)
            timings: dict[str, list[float]] = {"predict": [], "health": []}
            for _ in range(requests):
                for name, path in (("predict", "/api/predict?horizon=60"),
                                   ("health", "/api/health")):
                    started = time.perf_counter()
                    client.get(path).raise_for_status()
                    timings[name].append(time.perf_counter() - started)
    return {name: stats(values) for name, values in timings.items()}


def report(results: dict[str, Any]) -> str:
    rows = ["| request | median | p90 | p99 | max (ms) | goal |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, goal in (("predict", "p99 <= 5 ms"), ("health", "baseline")):
        s = results[name]
        rows.append(f"| GET /api/{name} | {s['median'] * 1000:.2f} | {s['p90'] * 1000:.2f} "
                    f"| {s['p99'] * 1000:.2f} | {s['max'] * 1000:.2f} | {goal} |")
    return "\n".join(rows)
