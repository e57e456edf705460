"""Offload through the path users take, beside the process-start floors and its peers.

One run: the spawn floor (`python -c pass`), the fork floor (`os.fork()`, POSIX), Offload
over HTTP (uvicorn serving `api_entry:app`, its own supervisor process, an HTTP client)
at cap 2 and cap 8, Huey (SQLite, process workers), and RQ and Celery when a
`redis-server` is on the PATH. For each: idle latency (one job at a time, submit ->
final state seen) and throughput (jobs submitted as fast as one client can, until all
are final).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.api import _free_port, _process
from bench.core import stats
from jobs import protocol as p

LATENCY_JOBS = 100
THROUGHPUT_JOBS = 300
WARMUP_JOBS = 5
CAPS = (2, 8)
POLL_S = 0.001
FLOOR_PARALLEL = 2  # as many at a time as Offload's cap 2 and Huey's 2 workers
HUEY_WORKERS = 2
TIMEOUT_S = 120.0
SLEEP_JOB = {"kind": "sleep", "input": {"seconds": 0, "steps": 1}}
# Runners taken by warm spare interpreters: the way without a safe fork (macOS, Windows).
SPARES = ({"OFFLOAD_LAUNCH_MODE": "spares"}, ", warm spares")


def _throughput(n: int, seconds: float, completed: int) -> dict[str, Any]:
    return {"jobs": n, "completed": completed, "seconds": seconds, "jobs_per_s": n / seconds}


def _latencies(one: Callable[[], None], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        one()
        samples.append(time.perf_counter() - t0)
    return stats(samples)


def spawn_floor() -> dict[str, Any]:
    command = [sys.executable, "-c", "pass"]

    def one() -> None:
        subprocess.Popen(command).wait()

    latency = _latencies(one, LATENCY_JOBS)
    t0 = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for _ in range(THROUGHPUT_JOBS):
        if len(running) == FLOOR_PARALLEL:
            running.pop(0).wait()
        running.append(subprocess.Popen(command))
    for proc in running:
        proc.wait()
    seconds = time.perf_counter() - t0
    return {"system": "floor: `Popen(python -c pass)`", "latency": latency,
            "throughput": _throughput(THROUGHPUT_JOBS, seconds, THROUGHPUT_JOBS)}


def fork_floor() -> dict[str, Any] | None:
    if not hasattr(os, "fork"):
        return None

    def one() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    latency = _latencies(one, LATENCY_JOBS)
    t0 = time.perf_counter()
    for _ in range(THROUGHPUT_JOBS):
        one()
    seconds = time.perf_counter() - t0
    return {"system": "floor: `os.fork()` + exit + wait", "latency": latency,
            "throughput": _throughput(THROUGHPUT_JOBS, seconds, THROUGHPUT_JOBS)}


def _wait_final(client: httpx.Client, job_id: str) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        state = str(client.get(f"/api/jobs/{job_id}").json()["state"])
        if state in p.FINAL_STATES:
            return state
        time.sleep(POLL_S)
    raise TimeoutError(f"job {job_id} did not finish")


def offload(cap: int, extra_env: dict[str, str] | None = None,
            label: str = "") -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-http-") as tmp:
        # A remote LLM named (never called): no embedded model server shares the cores.
        env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"), "OFFLOAD_MAX_CONCURRENT": str(cap),
               "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", **(extra_env or {})}
        args = ["-m", "uvicorn", "api_entry:app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]
        with _process(args, env, f"{url}/api/health"), \
                httpx.Client(base_url=url, timeout=60) as client:

            def submit() -> str:
                answer = client.post("/api/jobs", json=SLEEP_JOB)
                answer.raise_for_status()
                return str(answer.json()["id"])

            def one() -> None:
                state = _wait_final(client, submit())
                assert state == p.JobState.COMPLETED, state

            for _ in range(WARMUP_JOBS):  # the supervisor is up and its launcher warm
                one()
            latency = _latencies(one, LATENCY_JOBS)
            t0 = time.perf_counter()
            ids = [submit() for _ in range(THROUGHPUT_JOBS)]
            states = [_wait_final(client, job_id) for job_id in ids]
            seconds = time.perf_counter() - t0
    completed = states.count(p.JobState.COMPLETED)
    return {"system": f"Offload over HTTP, cap {cap}{label}", "latency": latency,
            "throughput": _throughput(THROUGHPUT_JOBS, seconds, completed)}


def huey() -> dict[str, Any] | None:
    try:
        from bench.baselines import huey_app
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="offload-bench-huey-") as tmp:
        db = str(Path(tmp) / "huey.db")
        app, noop = huey_app.connect(db)
        # Polled every 1 ms like Offload by its client; by default it backs off to 10 s.
        args = ["-m", "huey.bin.huey_consumer", "bench.baselines.huey_app.huey",
                "-k", "process", "-w", str(HUEY_WORKERS), "-d", str(POLL_S),
                "-m", str(POLL_S), "-b", "1", "-q"]
        with _process(args, {huey_app.DB_ENV: db}, None):

            def result(pending: Any) -> Any:
                deadline = time.monotonic() + TIMEOUT_S
                while time.monotonic() < deadline:
                    value = pending.get()
                    if value is not None:
                        return value
                    time.sleep(POLL_S)
                raise TimeoutError("the Huey task did not finish")

            def one() -> None:
                assert result(noop()) is True

            # The first waits for the consumer to start.
            for _ in range(WARMUP_JOBS):
                one()
            latency = _latencies(one, LATENCY_JOBS)
            t0 = time.perf_counter()
            pending = [noop() for _ in range(THROUGHPUT_JOBS)]
            completed = sum(1 for task in pending if result(task) is True)
            seconds = time.perf_counter() - t0
        app.storage.close()
    return {"system": f"Huey, SQLite, {HUEY_WORKERS} process workers", "latency": latency,
            "throughput": _throughput(THROUGHPUT_JOBS, seconds, completed)}


def run() -> dict[str, Any]:
    rows = [spawn_floor(), fork_floor(), *(offload(cap) for cap in CAPS), offload(2, *SPARES),
            huey()]
    reason = ("not measured yet" if shutil.which("redis-server")
              else "skipped: no redis-server on the PATH")
    return {"rows": [row for row in rows if row is not None],
            "skipped": {name: reason for name in ("RQ", "Celery")},
            "latency_jobs": LATENCY_JOBS, "throughput_jobs": THROUGHPUT_JOBS}


def report(results: dict[str, Any]) -> str:
    rows = results["rows"]
    floor = rows[0]
    rows_md = ["| system | jobs/s | idle latency median (ms) | p90 (ms) "
               "| jobs/s vs spawn floor | latency vs spawn floor |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        thr, lat = r["throughput"], r["latency"]
        done = "" if thr["completed"] == thr["jobs"] else f" ({thr['completed']} completed)"
        rows_md.append(
            f"| {r['system']} | {thr['jobs_per_s']:.0f}{done} | {lat['median'] * 1000:.1f} "
            f"| {lat['p90'] * 1000:.1f} "
            f"| {thr['jobs_per_s'] / floor['throughput']['jobs_per_s']:.2f}x "
            f"| {lat['median'] / floor['latency']['median']:.2f}x |")
    rows_md.append("")
    rows_md.append(f"Latency: {results['latency_jobs']} no-op jobs one at a time, submit -> "
                   f"final state seen (polled every {POLL_S * 1000:g} ms); throughput: "
                   f"{results['throughput_jobs']} submitted by one client, until all are final.")
    for name, why in results["skipped"].items():
        rows_md.append(f"\n{name}: {why}")
    return "\n".join(rows_md)
