"""Listing and history with many job files on disk, against a nearly empty folder.

The same real server is measured twice in one run: with 100 finished jobs in its
data folder (the baseline) and with 20,000. `GET /api/jobs` and `GET /api/history`
are requested in turn, after a warm-up that lets the server index the folder.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.api import _free_port, _process
from bench.core import stats
from jobs import protocol as p

SIZES = (100, 20_000)
REQUESTS = 300
ROUTES = ("/api/jobs", "/api/history")


def write_finished_jobs(jobs_dir: Path, n: int, age_s: float = 3600.0) -> list[str]:
    """`n` completed `sleep` jobs as the runners would have left them, oldest first;
    their files are dated `age_s` ago and spaced a millisecond apart."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    start = time.time() - age_s
    ids = []
    for i in range(n):
        job_id = p.new_id()
        created = start + i / 1000
        data = p.new_job(job_id, "sleep", {"seconds": 0}, 30)
        data.update({
            p.F_STATE: p.JobState.COMPLETED, p.F_CREATED_AT: p.iso(created),
            p.F_STARTED_AT: p.iso(created),
            p.F_FINISHED_AT: p.iso(created + 0.02), p.F_CREATED_NS: int(created * 1e9),
            p.F_RESULT: {"slept_s": 0}, p.F_EXIT_CODE: 0,
            p.F_RESOURCES: {"cpu_s": 0.01, "peak_rss_mb": 10.0},
        })
        folder = jobs_dir / job_id
        folder.mkdir()
        path = folder / p.JOB_FILE
        p.write_json(path, data)
        os.utime(path, (created, created))
        ids.append(job_id)
    return ids


def measure(n: int) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-scale-") as tmp:
        data_dir = Path(tmp) / "var"
        write_finished_jobs(data_dir / "jobs", n)
        env = {"OFFLOAD_DATA_DIR": str(data_dir), "OFFLOAD_MAX_JOBS": str(2 * n)}
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port)], env,
                      f"{url}/docs"), httpx.Client(base_url=url, timeout=60) as client:
            t0 = time.perf_counter()
            first = client.get("/api/jobs")
            first_s = time.perf_counter() - t0
            assert first.status_code == 200, first.text
            counts = client.get("/api/history").json()["counts"]
            assert counts[p.JobState.COMPLETED] == n, counts
            for route in ROUTES:  # warm-up
                for _ in range(20):
                    client.get(route)
            samples: dict[str, list[float]] = {route: [] for route in ROUTES}
            for _ in range(REQUESTS):
                for route in ROUTES:
                    t0 = time.perf_counter()
                    answer = client.get(route)
                    samples[route].append(time.perf_counter() - t0)
                    assert answer.status_code == 200
    return {"jobs": n, "first_listing_s": first_s,
            **{route: stats(values) for route, values in samples.items()}}


def run() -> dict[str, Any]:
    return {"sizes": [measure(n) for n in SIZES]}


def report(results: dict[str, Any]) -> str:
    base, big = results["sizes"][0], results["sizes"][-1]
    rows = ["| route | job files | median (ms) | p99 (ms) | max (ms) | p99 / baseline p99 | goal |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for route in ROUTES:
        for size in results["sizes"]:
            s = size[route]
            ratio = s["p99"] / base[route]["p99"]
            goal = "p99 <= 50 ms" if size is big else "baseline"
            rows.append(f"| `{route}` | {size['jobs']:,} | {s['median'] * 1000:.1f} "
                        f"| {s['p99'] * 1000:.1f} | {s['max'] * 1000:.1f} | {ratio:.2f}x "
                        f"| {goal} |")
    rows.append("")
    rows.append("First `/api/jobs` after the server started (indexing the folder): "
                + ", ".join(f"{s['jobs']:,} jobs {s['first_listing_s'] * 1000:.0f} ms"
                            for s in results["sizes"]) + ".")
    return "\n".join(rows)
