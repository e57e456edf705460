"""Soak: many `sleep 0` jobs through the HTTP API of one real server.

Jobs are submitted in waves (each wave waits for the previous one to finish, so the
queue stays realistic); after each wave the API process's and the supervisor
process's resident memory and open file descriptors are sampled. At the end every job
is read back: none may be missing or anything but `completed`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.api import _free_port, _process
from jobs.store.index import SETTLE_S

WAVE = 250
# Until the store's index has held a full SETTLE_S of finished jobs in full: the high-water
# mark of those first waves is the process's size from then on, not a leak.
WARMUP_JOBS = 6 * WAVE


def _server_pid(port: int) -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is not None:
                return conn.pid
    raise RuntimeError(f"no process listens on port {port}")


def _supervisor(api: psutil.Process) -> psutil.Process | None:
    for child in api.children():
        if "jobs.supervisor" in " ".join(child.cmdline()):
            return child
    return None


def _sample(proc: psutil.Process | None) -> dict[str, float]:
    if proc is None:
        return {"rss_mb": 0.0, "fds": 0}
    if sys.platform == "win32":
        fds = proc.num_handles()
    else:
        fds = proc.num_fds()
    return {"rss_mb": proc.memory_info().rss / 2**20, "fds": fds}


def _wave(client: httpx.Client, n: int, deadline_s: float = 300) -> list[str]:
    ids = []
    for _ in range(n):
        answer = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
        while answer.status_code == 429:  # beyond OFFLOAD_MAX_QUEUED: waits, as a client would
            time.sleep(float(answer.headers.get("Retry-After", "1")))
            answer = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
        answer.raise_for_status()
        ids.append(answer.json()["id"])
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        counts = client.get("/api/health").json()
        if counts["running"] == 0 and counts["queued"] == 0:
            return ids
        time.sleep(0.05)
    raise TimeoutError("the wave did not finish")


def _settle(client: httpx.Client) -> None:
    """Past the store's settle time, then one listing: finished jobs leave memory."""
    time.sleep(SETTLE_S + 1)
    client.get("/api/jobs").raise_for_status()
    time.sleep(0.5)


def soak(n: int = 10_000) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-soak-") as tmp:
        env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"),
               "OFFLOAD_MAX_JOBS": str(2 * (n + WARMUP_JOBS))}
        started = time.perf_counter()
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port)], env,
                      f"{url}/api/health"), httpx.Client(base_url=url, timeout=60) as client:
            api = psutil.Process(_server_pid(port))
            _wave(client, WARMUP_JOBS)
            _settle(client)
            supervisor = _supervisor(api)
            first = {"api": _sample(api), "supervisor": _sample(supervisor)}
            samples = [{"jobs": 0, **first}]
            ids: list[str] = []
            while len(ids) < n:
                ids += _wave(client, min(WAVE, n - len(ids)))
                samples.append({"jobs": len(ids), "api": _sample(api),
                                "supervisor": _sample(supervisor)})
            _settle(client)
            last = {"api": _sample(api), "supervisor": _sample(supervisor)}
            samples.append({"jobs": len(ids), **last})
            states: dict[str, int] = {}
            errors: list[Any] = []
            for job_id in ids:
                answer = client.get(f"/api/jobs/{job_id}")
                job = answer.json() if answer.status_code == 200 else {"state": "missing"}
                states[job["state"]] = states.get(job["state"], 0) + 1
                if job["state"] != "completed" and len(errors) < 5:
                    errors.append({"id": job_id, "state": job["state"], "error": job.get("error")})
            elapsed = time.perf_counter() - started
    return {
        "jobs": n, "seconds": elapsed, "states": states, "errors": errors,
        "lost": n - states.get("completed", 0),
        "api_rss_growth_mb": last["api"]["rss_mb"] - first["api"]["rss_mb"],
        "api_fds": [first["api"]["fds"], last["api"]["fds"]],
        "supervisor_rss_growth_mb": (last["supervisor"]["rss_mb"]
                                     - first["supervisor"]["rss_mb"]),
        "supervisor_fds": [first["supervisor"]["fds"], last["supervisor"]["fds"]],
        "api_rss_mb": [first["api"]["rss_mb"], last["api"]["rss_mb"]],
        "samples": samples,
    }


def run() -> dict[str, Any]:
    return soak(int(os.environ.get("OFFLOAD_SOAK_JOBS", "10000")))


def report(results: dict[str, Any]) -> str:
    r = results
    rows = [
        "| measure | figure | goal |",
        "| --- | --- | --- |",
        f"| `sleep 0` jobs through the HTTP API | {r['jobs']:,} in {r['seconds']:.0f} s "
        f"({r['jobs'] / r['seconds']:.0f}/s) | |",
        f"| lost or not completed | {r['lost']} | 0 |",
        f"| API process RSS | {r['api_rss_mb'][0]:.1f} -> {r['api_rss_mb'][1]:.1f} MB "
        f"(+{r['api_rss_growth_mb']:.1f}) | growth <= 10 MB |",
        f"| API open file descriptors | {r['api_fds'][0]} -> {r['api_fds'][1]} | back to start |",
        f"| supervisor process RSS growth | +{r['supervisor_rss_growth_mb']:.1f} MB | |",
        f"| supervisor open file descriptors | {r['supervisor_fds'][0]} -> "
        f"{r['supervisor_fds'][1]} | back to start |",
    ]
    return "\n".join(rows)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [s["jobs"] for s in results["samples"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(jobs, [s["api"]["rss_mb"] for s in results["samples"]], label="API RSS (MB)")
    ax.plot(jobs, [s["supervisor"]["rss_mb"] for s in results["samples"]],
            label="supervisor RSS (MB)")
    ax.set_xlabel("jobs completed")
    ax.set_ylabel("MB")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
