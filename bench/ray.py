"""The local launcher against the Ray launcher on the same machine, in one run.

A Ray head is started here (loopback, 2 CPUs, as the tests do); `sleep 0` jobs are
submitted one at a time, alternating between a supervisor with each launcher:

- dispatch: the job created -> its runner running (the runner's own `started_at`,
  same clock: the head is on this machine);
- lifecycle: the job created -> its final state readable in the local job file
  (for Ray: through the job's poller, every 0.2 s).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.core import _wait_final, stats
from jobs import protocol as p
from jobs.launch.base import Launcher
from jobs.launch.local import LocalLauncher
from jobs.launch.ray import RayLauncher
from jobs.store.job_store import JobStore
from jobs.supervisor.loop import Supervisor
from jobs.supervisor.thread import SupervisorThread

LAUNCHERS = ("local", "ray")


@contextlib.contextmanager
def _supervised(launcher: Launcher) -> Iterator[tuple[JobStore, Supervisor]]:
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        jobs_dir = Path(tmp) / "jobs"
        supervisor = Supervisor(jobs_dir, max_concurrent=2, launcher=launcher)
        store = JobStore(jobs_dir)
        store.ensure_dir()
        with SupervisorThread(supervisor):
            yield store, supervisor


def _one(store: JobStore, supervisor: Supervisor) -> tuple[float, float]:
    """(dispatch, lifecycle) of one `sleep 0` job, in seconds."""
    created_wall = time.time()
    t0 = time.perf_counter()
    job_id = store.create("sleep", {"seconds": 0}, 60)["id"]
    supervisor.wake()
    job = _wait_final(store, job_id, timeout=120)
    lifecycle = time.perf_counter() - t0
    assert job[p.F_STATE] == p.JobState.COMPLETED, job
    return p.parse_iso(job[p.F_STARTED_AT]) - created_wall, lifecycle


def run(rounds: int = 20, address: str | None = None) -> dict[str, Any]:
    from tests.ray_head import RayHead

    head = None if address else RayHead(num_cpus=2).start()
    samples: dict[str, dict[str, list[float]]] = {
        name: {"dispatch": [], "lifecycle": []} for name in LAUNCHERS}
    try:
        ray = RayLauncher(address or (head.address if head else ""))
        with _supervised(LocalLauncher()) as local, _supervised(ray) as remote:
            pairs = {"local": local, "ray": remote}
            for name in LAUNCHERS:  # warm both: page cache, Ray's worker pool
                _one(*pairs[name])
            for _ in range(rounds):
                for name in LAUNCHERS:
                    dispatch, lifecycle = _one(*pairs[name])
                    samples[name]["dispatch"].append(dispatch)
                    samples[name]["lifecycle"].append(lifecycle)
    finally:
        if head is not None:
            head.stop()
    out: dict[str, Any] = {name: {measure: stats(values) for measure, values in each.items()}
                           for name, each in samples.items()}
    out["ratio_median"] = {m: out["ray"][m]["median"] / out["local"][m]["median"]
                           for m in ("dispatch", "lifecycle")}
    return out


def report(results: dict[str, Any]) -> str:
    def cell(s: dict[str, float]) -> str:
        return " / ".join(f"{s[k] * 1000:.0f}" for k in ("median", "p90", "max"))

    titles = {"dispatch": "dispatch: created -> runner running",
              "lifecycle": "`sleep 0` job: created -> final in the local job file"}
    rows = ["| measure (ms, median / p90 / max) | local launcher | Ray launcher | Ray / local "
            "(medians) |", "| --- | --- | --- | --- |"]
    for measure, title in titles.items():
        rows.append(f"| {title} | {cell(results['local'][measure])} "
                    f"| {cell(results['ray'][measure])} "
                    f"| {results['ratio_median'][measure]:.0f}x |")
    rows.append(f"\n{results['local']['lifecycle']['n']} jobs each, alternating; a Ray head "
                "with 2 CPUs on the same machine.")
    return "\n".join(rows)
