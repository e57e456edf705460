"""Benchmark of the job core, in one run, against a baseline measured alongside it.

- lifecycle of a `sleep 0` job (created -> final state readable) against a bare
  `python -c pass` started with the same interpreter, interleaved;
- throughput of `sleep 0` jobs with the cap at 8;
- a runner's peak RSS, for `sleep` and for a chat against a (scripted) remote server.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.store.job_store import JobStore
from jobs.supervisor.loop import Supervisor
from jobs.supervisor.thread import SupervisorThread


@contextlib.contextmanager
def _supervised(max_concurrent: int, runner_env: dict[str, str] | None = None
                ) -> Iterator[tuple[JobStore, Supervisor]]:
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        jobs_dir = Path(tmp) / "jobs"
        supervisor = Supervisor(jobs_dir, max_concurrent=max_concurrent, runner_env=runner_env)
        store = JobStore(jobs_dir)
        store.ensure_dir()
        with SupervisorThread(supervisor):
            yield store, supervisor


def _wait_final(store: JobStore, job_id: str, timeout: float = 60) -> dict[str, Any]:
    path = store.path(job_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = p.read_json(path)
        except p.CorruptJobFile:
            data = None
        if data and data.get(p.F_STATE) in p.FINAL_STATES:
            return data
        time.sleep(0.0005)
    raise TimeoutError(f"job {job_id} did not finish")


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"n": len(ordered), "median": statistics.median(ordered), "p90": pct(0.9),
            "p99": pct(0.99), "max": ordered[-1]}


def lifecycle(rounds: int = 40) -> dict[str, Any]:
    bare: list[float] = []
    jobs: list[float] = []
    with _supervised(8) as (store, supervisor):
        for _ in range(3):  # warm the page cache and the supervisor
            _wait_final(store, store.create("sleep", {"seconds": 0}, 30)["id"])
        for _ in range(rounds):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            job_id = store.create("sleep", {"seconds": 0}, 30)["id"]
            supervisor.wake()
            job = _wait_final(store, job_id)
            jobs.append(time.perf_counter() - t0)
            assert job[p.F_STATE] == p.JobState.COMPLETED, job
    b, j = stats(bare), stats(jobs)
    return {"bare": b, "job": j, "ratio_median": j["median"] / b["median"]}


def throughput(n: int = 300, cap: int = 8) -> dict[str, Any]:
    with _supervised(cap) as (store, supervisor):
        _wait_final(store, store.create("sleep", {"seconds": 0}, 30)["id"])
        t0 = time.perf_counter()
        ids = [store.create("sleep", {"seconds": 0}, 60)["id"] for _ in range(n)]
        supervisor.wake()
        finals = [_wait_final(store, i, timeout=120) for i in ids]
        elapsed = time.perf_counter() - t0
    completed = sum(1 for f in finals if f[p.F_STATE] == p.JobState.COMPLETED)
    return {"jobs": n, "completed": completed, "seconds": elapsed, "jobs_per_s": n / elapsed}


def peak_rss(rounds: int = 5) -> dict[str, Any]:
    from tests.fake_llm import FakeLLM

    out: dict[str, Any] = {}
    with _supervised(4) as (store, supervisor):
        sleeps = [_wait_final(store, store.create("sleep", {"seconds": 0.2}, 30)["id"])
                  for _ in range(rounds)]
    out["sleep_mb"] = max(s[p.F_RESOURCES]["peak_rss_mb"] for s in sleeps)
    with FakeLLM(pieces=["word "] * 50, delay_s=0.005) as llm, \
            _supervised(4, {"OPENAI_BASE_URL": llm.base_url}) as (store, supervisor):
        chats = [_wait_final(store, store.create(
            "chat", {"messages": [{"role": "user", "content": "hi"}]}, 30)["id"])
            for _ in range(rounds)]
    assert all(c[p.F_STATE] == p.JobState.COMPLETED for c in chats), chats
    out["chat_mb"] = max(c[p.F_RESOURCES]["peak_rss_mb"] for c in chats)
    return out


def run() -> dict[str, Any]:
    return {"lifecycle": lifecycle(), "throughput": throughput(), "peak_rss": peak_rss()}


def report(results: dict[str, Any]) -> str:
    life, thr, rss = results["lifecycle"], results["throughput"], results["peak_rss"]

    def ms(s: dict[str, float], key: str) -> str:
        return f"{s[key] * 1000:.1f}"

    rows = [
        "| measure | median | p90 | p99 | max | goal |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| bare `python -c pass` (ms) | {ms(life['bare'], 'median')} | {ms(life['bare'], 'p90')} "
        f"| {ms(life['bare'], 'p99')} | {ms(life['bare'], 'max')} | baseline |",
        f"| `sleep 0` job, created -> final (ms) | {ms(life['job'], 'median')} "
        f"| {ms(life['job'], 'p90')} | {ms(life['job'], 'p99')} | {ms(life['job'], 'max')} "
        f"| <= 2.5x baseline |",
        f"| lifecycle / bare start (medians) | {life['ratio_median']:.2f}x | | | | <= 2.5x |",
        f"| throughput, cap 8, {thr['jobs']} jobs | {thr['jobs_per_s']:.1f} jobs/s | | | "
        f"| >= 30 jobs/s |",
        f"| runner peak RSS, sleep | {rss['sleep_mb']:.1f} MB | | | | <= 25 MB |",
        f"| runner peak RSS, chat (remote server) | {rss['chat_mb']:.1f} MB | | | | <= 25 MB |",
    ]
    return "\n".join(rows)


def main() -> None:
    results = run()
    print(report(results))


if __name__ == "__main__":
    main()
