"""Listing and history with many job files on disk, against a nearly empty folder; and
what a backlog of queued jobs costs while nothing runs.

The same real server is measured twice in one run: with 100 finished jobs in its
data folder (the baseline) and with 20,000. `GET /api/jobs` and `GET /api/history`
are requested in turn, after a warm-up that lets the server index the folder.
Then a server with its queue paused is given 100 jobs (the baseline), then 5,000, over
`POST /api/jobs/batch`, and the CPU its API worker and its supervisor use while idle
is read from `/proc`. Last, the dashboard's poll of its jobs table with 50 finished chats
of long conversations in the folder: the listing in full against `fields=summary`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.api import _free_port, _process
from bench.core import stats
from jobs import protocol as p

SIZES = (100, 20_000)
BACKLOGS = (100, 5_000)
IDLE_S = 10.0  # CPU read over this long, once the backlog is stored and listed
BATCH = 500
REQUESTS = 300
ROUTES = ("/api/jobs", "/api/history")
BIG_CHATS = 50
BIG_TURNS, TURN_CHARS = 9, 100_000  # each chat's input: 900 KB of conversation
POLLS = 30  # of each listing, alternating
LISTINGS = {"full": "/api/jobs?limit=50", "summary": "/api/jobs?limit=50&fields=summary"}


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


def write_big_chats(jobs_dir: Path, n: int) -> None:
    """`n` completed chats, each of a conversation of BIG_TURNS turns of TURN_CHARS
    characters, with a short reply, as the chat runner leaves them."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    start = time.time() - 600
    messages = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": f"turn {i} " + "x" * TURN_CHARS} for i in range(BIG_TURNS)]
    reply = "The CPU is fine. " * 20
    for i in range(n):
        job_id, created = p.new_id(), start + i
        data = p.new_job(job_id, "chat", {"messages": messages}, 600, created)
        data.update({
            p.F_STATE: p.JobState.COMPLETED, p.F_STARTED_AT: p.iso(created),
            p.F_FINISHED_AT: p.iso(created + 4), p.F_CREATED_NS: int(created * 1e9),
            p.F_OUTPUT: reply, p.F_EXIT_CODE: 0,
            p.F_RESULT: {"reply": reply, "model": "m", "finish_reason": "stop",
                         "usage": {"prompt_tokens": 200_000, "completion_tokens": 100}},
            p.F_RESOURCES: {"cpu_s": 0.2, "peak_rss_mb": 30.0},
        })
        (jobs_dir / job_id).mkdir()
        p.write_json(jobs_dir / job_id / p.JOB_FILE, data)


def big_chats(n: int = BIG_CHATS) -> dict[str, Any]:
    """The jobs table's poll (50 jobs) with `n` big chats: bytes and time a poll, the
    listing in full and summarised, asked in turn."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-chats-") as tmp:
        data_dir = Path(tmp) / "var"
        write_big_chats(data_dir / "jobs", n)
        env = {"OFFLOAD_DATA_DIR": str(data_dir), "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port),
                       "--log-level", "warning"], env, f"{url}/docs"), \
                httpx.Client(base_url=url, timeout=60) as client:
            sizes = {name: len(client.get(path).content) for name, path in LISTINGS.items()}
            samples: dict[str, list[float]] = {name: [] for name in LISTINGS}
            for _ in range(POLLS):
                for name, path in LISTINGS.items():
                    t0 = time.perf_counter()
                    answer = client.get(path)
                    samples[name].append(time.perf_counter() - t0)
                    assert answer.status_code == 200 and len(answer.json()["jobs"]) == n
    return {"chats": n, "input_bytes": BIG_TURNS * TURN_CHARS,
            **{name: {"bytes": sizes[name], **stats(samples[name])} for name in LISTINGS}}


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


def idle_backlog(n: int) -> dict[str, Any]:
    """The CPU the API worker and the supervisor use while `n` jobs wait in a paused
    queue and nothing else happens (percent of one CPU)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-backlog-") as tmp:
        env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"), "OFFLOAD_MAX_QUEUED": str(2 * n),
               "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # never called: no model server
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port)], env,
                      f"{url}/api/health"), httpx.Client(base_url=url, timeout=120) as client:
            client.post("/api/queue/pause").raise_for_status()
            for done in range(0, n, BATCH):
                jobs = [{"kind": "sleep", "input": {"seconds": 0}}] * min(BATCH, n - done)
                client.post("/api/jobs/batch", json={"jobs": jobs}).raise_for_status()
            deadline = time.monotonic() + 60
            while client.get("/api/history").json()["counts"][p.JobState.QUEUED] != n:
                assert time.monotonic() < deadline, "the backlog was not listed"
                time.sleep(0.2)
            time.sleep(2.0)  # the supervisor has read them all
            api = next(each for each in psutil.process_iter(["cmdline"])
                       if f"--port {port}" in " ".join(each.info["cmdline"] or []))
            supervisor = next(each for each in api.children()
                              if "jobs.supervisor" in " ".join(each.cmdline()))
            before = [sum(each.cpu_times()[:2]) for each in (api, supervisor)]
            time.sleep(IDLE_S)
            after = [sum(each.cpu_times()[:2]) for each in (api, supervisor)]
    api_cpu, supervisor_cpu = ((b - a) / IDLE_S * 100 for a, b in zip(before, after, strict=True))
    return {"queued": n, "api_cpu_pct": api_cpu, "supervisor_cpu_pct": supervisor_cpu}


def run() -> dict[str, Any]:
    return {"sizes": [measure(n) for n in SIZES],
            "backlogs": [idle_backlog(n) for n in BACKLOGS], "big_chats": big_chats()}


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
    rows += ["", "| jobs queued, the queue paused, nothing running | API worker's CPU (% of one) "
             "| supervisor's CPU (% of one) |", "| --- | ---: | ---: |"]
    for backlog in results.get("backlogs", []):
        rows.append(f"| {backlog['queued']:,} | {backlog['api_cpu_pct']:.1f} "
                    f"| {backlog['supervisor_cpu_pct']:.1f} |")
    if "big_chats" in results:
        rows += ["", *big_chats_table(results["big_chats"])]
    return "\n".join(rows)


def big_chats_table(chats: dict[str, Any]) -> list[str]:
    rows = [f"| the jobs table's poll, {chats['chats']} finished chats of "
            f"{chats['input_bytes'] / 1000:.0f} KB of input each | bytes a poll | median (ms) "
            "| p99 (ms) |", "| --- | ---: | ---: | ---: |"]
    for name, path in LISTINGS.items():
        s = chats[name]
        rows.append(f"| `{path}` | {s['bytes']:,} | {s['median'] * 1000:.1f} "
                    f"| {s['p99'] * 1000:.1f} |")
    return rows
