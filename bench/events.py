"""How soon a runner's write reaches an `/events` client, and what followers cost the API.

Over HTTP, as a dashboard sees it: uvicorn serving `api_entry:app` with its supervisor
process. A `sleep` job is submitted; while its runner sleeps, another process rewrites its
job file the way runners do (`jobs.protocol.write_json`), each write's wall time in the
progress message, and a client following `/events` timestamps each event's arrival.
Modes in alternating rounds of one run: change notifications (the default) and
`OFFLOAD_EVENT_NOTIFY=0`, the 40 ms poll every stream made before notifications; and
a chat with a big prompt (BIG_PROMPT characters of input, its output growing by a word
a write), followed as events now go (what changed) and as they went before (the whole
job each time: `bench/baselines/whole_events.py`).

Phases of each round, `/api/health` polled from another process throughout:
0. nothing written, nothing followed: health idle;
1. writes every 20-30 ms, one follower: write -> seen;
2. writes 5 a second (a chat's pace), one follower: the health baseline;
3. the same with 200 more followers of the job (another process): health, write -> seen.

`python -m bench.events write PATH COUNT LOW_S HIGH_S PROMPT` and `... follow URL JOB N`
are the writer's and the followers' processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.api import ROOT, _free_port, _process
from bench.core import stats

APP = "api_entry:app"
BIG_PROMPT = 90_000
# name: (OFFLOAD_EVENT_NOTIFY, the app, characters of prompt in the job's input)
MODES = {"notify": ("1", APP, 0), "poll": ("0", APP, 0),
         "big prompt, what changed": ("1", APP, BIG_PROMPT),
         "big prompt, whole job": ("1", "bench.baselines.whole_events:app", BIG_PROMPT)}
ROUNDS = 2
FAST_WRITES, FAST_GAP_S = 150, (0.02, 0.03)
CHAT_GAP_S = (0.2, 0.2)
CHAT_PHASE_S = 8.0
IDLE_S = 4.0
FOLLOWERS = 200


class TimedStream(threading.Thread):
    """Follows a job's events; for each, (wall time written, wall time seen)."""

    def __init__(self, url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.job_id = url, job_id
        self.seen: list[tuple[float, float]] = []
        self.ready = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client, \
                client.stream("GET", f"/api/jobs/{self.job_id}/events") as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.time()
                self.ready.set()
                message = (json.loads(line[6:]).get("progress") or {}).get("message") or ""
                if message.startswith("t="):
                    self.seen.append((float(message[2:]), now))


def _write(path: Path, count: int, gap_s: tuple[float, float], prompt: int) -> None:
    subprocess.run([sys.executable, "-m", "bench.events", "write", str(path), str(count),
                    str(gap_s[0]), str(gap_s[1]), str(prompt)], cwd=ROOT, check=True)


def _health(series: Path, start: float, end: float) -> list[float]:
    rows = [json.loads(line) for line in series.read_text().splitlines()]
    return [lat for t, lat, status in rows if status == 200 and start <= t <= end]


def _delays(stream: TimedStream, start: float, end: float) -> list[float]:
    return [seen - wrote for wrote, seen in stream.seen if start <= wrote <= end]


def measure(mode: str) -> dict[str, Any]:
    notify, app, prompt = MODES[mode]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-events-") as tmp:
        data = Path(tmp) / "var"
        # No embedded model: it would load on this machine's cores during the rounds.
        env = {"OFFLOAD_DATA_DIR": str(data), "OFFLOAD_EVENT_NOTIFY": notify,
               "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
        series = Path(tmp) / "health.jsonl"
        with _process(["-m", "uvicorn", app, "--port", str(port),
                       "--log-level", "warning"], env, f"{url}/api/health"), \
                _process(["-m", "bench.poller", f"{url}/api/health", str(series), "0.01"],
                         {}, None), httpx.Client(base_url=url, timeout=30) as client:
            job = client.post("/api/jobs", json={"kind": "sleep",
                                                 "input": {"seconds": 300, "steps": 1}}).json()
            while client.get(f"/api/jobs/{job['id']}").json()["state"] != "running":
                time.sleep(0.05)
            path = data / "jobs" / job["id"] / "job.json"
            idle_from = time.time()
            time.sleep(IDLE_S)
            idle_to = time.time()
            stream = TimedStream(url, job["id"])
            stream.start()
            stream.ready.wait(30)
            t0 = time.time()
            _write(path, FAST_WRITES, FAST_GAP_S, prompt)
            t1 = time.time()
            chat_writes = int(CHAT_PHASE_S / CHAT_GAP_S[0])
            _write(path, chat_writes, CHAT_GAP_S, prompt)
            t2 = time.time()
            followers = subprocess.Popen(
                [sys.executable, "-m", "bench.events", "follow", url, job["id"],
                 str(FOLLOWERS)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert followers.stdout is not None
            followers.stdout.readline()  # all connected and sent their first event
            t3 = time.time()
            _write(path, chat_writes, CHAT_GAP_S, prompt)
            t4 = time.time()
            client.delete(f"/api/jobs/{job['id']}")
            followed = json.loads(followers.communicate(timeout=60)[0] or "{}")
            stream.join(30)
        return {"mode": mode, "fast": _delays(stream, t0, t1),
                "crowd": _delays(stream, t3, t4),
                "health_idle": _health(series, idle_from, idle_to),
                "health_alone": _health(series, t1, t2),
                "health_crowd": _health(series, t3, t4), "followers_events": followed}


def run() -> dict[str, Any]:
    rounds = [measure(mode) for _ in range(ROUNDS) for mode in MODES]
    results = []
    for mode in MODES:
        mine = [r for r in rounds if r["mode"] == mode]

        def pooled(key: str, mine: list[dict[str, Any]] = mine) -> dict[str, float]:
            return stats([x for r in mine for x in r[key]] or [float("nan")])

        results.append({"mode": mode, "rounds": len(mine),
                        **{key: pooled(key) for key in
                           ("fast", "crowd", "health_idle", "health_alone",
                            "health_crowd")},
                        "followers_events": [r["followers_events"] for r in mine]})
    return {"modes": results, "followers": FOLLOWERS, "big_prompt": BIG_PROMPT}


def report(results: dict[str, Any]) -> str:
    def ms(value: float) -> str:
        return f"{value * 1000:.2f}"

    n = results["followers"]
    small = [r for r in results["modes"] if not r["mode"].startswith("big prompt")]
    big = [r for r in results["modes"] if r["mode"].startswith("big prompt")]
    rows = [f"| mode | write -> seen median / p90 (ms) | the same with {n} more followers "
            f"| /api/health p50 / p99 (ms), one follower | with {n} more followers |",
            "| --- | --- | --- | --- | --- |"]
    for r in small:
        rows.append(
            f"| {r['mode']} | {ms(r['fast']['median'])} / {ms(r['fast']['p90'])} "
            f"| {ms(r['crowd']['median'])} / {ms(r['crowd']['p90'])} "
            f"| {ms(r['health_alone']['median'])} / {ms(r['health_alone']['p99'])} "
            f"| {ms(r['health_crowd']['median'])} / {ms(r['health_crowd']['p99'])} |")
    rows.append("")
    rows.append("Goal (issue 16): write -> seen median <= 5 ms. `poll`: OFFLOAD_EVENT_NOTIFY=0, "
                "the 40 ms look at the job file.")
    if big:
        kb = results.get("big_prompt", BIG_PROMPT) // 1000
        rows += ["", f"A chat with a {kb} KB prompt, its reply growing 5 times a second:",
                 "", f"| events | /api/health p50 / p99 (ms), idle | one follower "
                 f"| {n} more followers | p99 / idle p99 | write -> seen median / p90 (ms), "
                 f"with {n} | received by the {n} (MB) |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in big:
            received = [f.get("bytes", 0) for f in r["followers_events"]]
            rows.append(
                f"| {r['mode'].removeprefix('big prompt, ')} "
                f"| {ms(r['health_idle']['median'])} / {ms(r['health_idle']['p99'])} "
                f"| {ms(r['health_alone']['median'])} / {ms(r['health_alone']['p99'])} "
                f"| {ms(r['health_crowd']['median'])} / {ms(r['health_crowd']['p99'])} "
                f"| {r['health_crowd']['p99'] / r['health_idle']['p99']:.1f}x "
                f"| {ms(r['crowd']['median'])} / {ms(r['crowd']['p90'])} "
                f"| {' / '.join(f'{b / 1e6:.1f}' for b in received)} |")
        rows += ["", f"Goal (issue 17): {n} followers of one chat keep /api/health p99 "
                 "<= 3x idle. `whole job`: every event the whole job, input included, as "
                 "before 0.10 (bench/baselines/whole_events.py); received: per round, the "
                 "first events included."]
    return "\n".join(rows)


def _writer(path: str, count: int, low: float, high: float, prompt: int) -> None:
    from jobs import protocol as p

    job = p.read_json(path)
    assert job is not None
    if prompt:  # a chat's job file: its question in the input, its reply growing
        job[p.F_INPUT] = {"messages": [{"role": "user", "content": "x" * prompt}]}
    for _ in range(count):
        job[p.F_PROGRESS] = {"fraction": None, "message": f"t={time.time():.6f}"}
        if prompt:
            job[p.F_OUTPUT] = (job.get(p.F_OUTPUT) or "") + "word "
        p.write_json(path, job)
        time.sleep(random.uniform(low, high))
    time.sleep(0.1)  # the last write's event, before the next phase begins


async def _followers(url: str, job_id: str, n: int) -> None:
    host, port = url.split("//")[1].split(":")
    counts = [0] * n
    received = [0] * n
    ready = asyncio.Semaphore(0)

    async def follow(i: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        signalled = False
        while chunk := await reader.read(65536):
            counts[i] += chunk.count(b"data: ")
            received[i] += len(chunk)
            if counts[i] and not signalled:
                signalled = True
                ready.release()
        writer.close()

    tasks = [asyncio.create_task(follow(i)) for i in range(n)]
    for _ in range(n):
        await ready.acquire()
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    print(json.dumps({"min": min(counts), "max": max(counts), "bytes": sum(received)}),
          flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        _writer(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]),
                int(sys.argv[6]))
    else:
        asyncio.run(_followers(sys.argv[2], sys.argv[3], int(sys.argv[4])))
