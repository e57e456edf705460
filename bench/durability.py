"""What durability costs: the same real server with and without fsync, in one run.

A job's creation (before the 202), its final state and its launch records are fsync'd
(`jobs.protocol.write_atomic`). `OFFLOAD_FSYNC=0`, for benchmarks only, turns that off.
Rounds alternate between the two, each on a fresh server and data folder: a warm-up,
then submissions one after another on a warm connection (the submit latency), then the
wait until every job has ended (what the final states and launch records add).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.api import _free_port, _process
from bench.core import stats
from jobs import protocol as p

ROUNDS = 3  # per mode, alternating
SUBMITS = 100
WARMUP = 5
DONE_WITHIN_S = 120.0
MODES = {"fsync": "1", "no fsync (OFFLOAD_FSYNC=0)": "0"}


def measure(fsync: str) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-durability-") as tmp:
        env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"), "OFFLOAD_FSYNC": fsync}
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port),
                       "--log-level", "warning"], env, f"{url}/docs"), \
                httpx.Client(base_url=url, timeout=60) as client:
            body = {"kind": "sleep", "input": {"seconds": 0}}
            for _ in range(WARMUP):
                client.post("/api/jobs", json=body).raise_for_status()
            submits: list[float] = []
            ids: list[str] = []
            started = time.perf_counter()
            for _ in range(SUBMITS):
                t0 = time.perf_counter()
                answer = client.post("/api/jobs", json=body)
                submits.append(time.perf_counter() - t0)
                answer.raise_for_status()
                ids.append(answer.json()["id"])
            all_done = _wait_all_final(client, ids)
            batch_s = time.perf_counter() - started
    return {"submit": submits, "batch_s": batch_s, "completed": all_done}


def _wait_all_final(client: httpx.Client, ids: list[str]) -> bool:
    deadline = time.monotonic() + DONE_WITHIN_S
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        state = client.get(f"/api/jobs/{pending[0]}").json()["state"]
        if state in p.FINAL_STATES:
            pending.pop(0)
        else:
            time.sleep(0.05)
    return not pending


def run() -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(ROUNDS):
        for mode, value in MODES.items():
            rounds[mode].append(measure(value))
    return {"modes": [{
        "mode": mode, "rounds": len(results),
        "submit": stats([x for r in results for x in r["submit"]]),
        "batch_s": stats([r["batch_s"] for r in results]),
        "completed": all(r["completed"] for r in results),
    } for mode, results in rounds.items()]}


def report(results: dict[str, Any]) -> str:
    rows = [f"| mode | submit p50 / p90 / p99 / max (ms) | {SUBMITS} jobs submitted and "
            "ended, median (s) | all ended |",
            "| --- | --- | --- | --- |"]
    for r in results["modes"]:
        s = r["submit"]
        rows.append(f"| {r['mode']} | {s['median'] * 1000:.1f} / {s['p90'] * 1000:.1f} / "
                    f"{s['p99'] * 1000:.1f} / {s['max'] * 1000:.1f} "
                    f"| {r['batch_s']['median']:.2f} | {'yes' if r['completed'] else 'no'} |")
    rows.append("")
    rows.append(f"{SUBMITS} `sleep` jobs (0 s) submitted one after another, "
                f"{results['modes'][0]['rounds']} rounds per mode, alternating; a fresh "
                "server and data folder each round.")
    return "\n".join(rows)
