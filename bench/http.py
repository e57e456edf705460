"""Offload through the path users take, beside the process-start floors and its peers.

One run: the spawn floor (`python -c pass`), the fork floor (`os.fork()`, POSIX), Offload
over HTTP (uvicorn serving `api_entry:app`, its own supervisor process, an HTTP client)
at cap 2 and cap 8, Huey (SQLite, process workers), and RQ and Celery when a
`redis-server` is on the PATH. For each: idle latency (one job at a time, submit ->
final state seen) and throughput (jobs submitted as fast as one client can, until all
are final). Then the same for each system's own blocking wait where it has one: Offload's
`GET /api/jobs/{id}?wait_s=`, RQ's `Job.latest_result(timeout=)`, Celery's
`AsyncResult.get()`. Last, the goals' ratios (Offload's latency against the spawn
floor's, its warm spares' against its fork path's, its throughput against RQ's, cap 8's
against cap 2's) measured in turns, round after round (`in_turns`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import httpx
import psutil

from bench.api import _free_port, _process
from bench.core import stats
from jobs import protocol as p

T = TypeVar("T")

LATENCY_JOBS = 100
THROUGHPUT_JOBS = 300
WARMUP_JOBS = 5
CAPS = (2, 8)
TURNS = 5  # rounds of the goals' ratios measured in turns (`in_turns`)
TURN_LATENCY_JOBS = 30
POLL_S = 0.001
IDLE_GAP_S = 0.3  # quiet before each of the second latency series: the system idle
FLOOR_PARALLEL = 2  # as many at a time as Offload's cap 2 and each peer's 2 workers
HUEY_WORKERS = 2
RQ_WORKERS = 2
CELERY_PROCESSES = 2
TIMEOUT_S = 120.0
WAIT_S = 30  # each blocking wait's bound: within the client's 60 s timeout
SLEEP_JOB = {"kind": "sleep", "input": {"seconds": 0, "steps": 1}}
# Runners taken by warm spare interpreters: the way without a safe fork (macOS, Windows).
SPARES = ({"OFFLOAD_LAUNCH_MODE": "spares"}, ", warm spares")
# Without fsync, as the peers run here (Huey's SQLite and the bench's Redis save nothing
# durably): what Offload's durability costs.
NO_FSYNC = ({"OFFLOAD_FSYNC": "0"}, ", no fsync (as the peers here)")


def _throughput(n: int, seconds: float, completed: int) -> dict[str, Any]:
    return {"jobs": n, "completed": completed, "seconds": seconds, "jobs_per_s": n / seconds}


def _series(one: Callable[[], None], n: int, gap: float) -> dict[str, float]:
    """`n` jobs one at a time, each after `gap` seconds of quiet."""
    samples = []
    for _ in range(n):
        time.sleep(gap)
        t0 = time.perf_counter()
        one()
        samples.append(time.perf_counter() - t0)
    return stats(samples)


def _latencies(one: Callable[[], None], n: int) -> tuple[dict[str, float], dict[str, float]]:
    """`n` jobs one at a time back to back, then `n` each after IDLE_GAP_S of quiet."""
    return _series(one, n, 0.0), _series(one, n, IDLE_GAP_S)


def _timed(run: Callable[[], int]) -> dict[str, Any]:
    """THROUGHPUT_JOBS by `run()`, which answers how many completed."""
    t0 = time.perf_counter()
    completed = run()
    return _throughput(THROUGHPUT_JOBS, time.perf_counter() - t0, completed)


SPAWN = [sys.executable, "-c", "pass"]


def _spawn_one() -> None:
    subprocess.Popen(SPAWN).wait()


def spawn_floor() -> dict[str, Any]:
    latency, quiet = _latencies(_spawn_one, LATENCY_JOBS)
    t0 = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for _ in range(THROUGHPUT_JOBS):
        if len(running) == FLOOR_PARALLEL:
            running.pop(0).wait()
        running.append(subprocess.Popen(SPAWN))
    for proc in running:
        proc.wait()
    seconds = time.perf_counter() - t0
    return {"system": "floor: `Popen(python -c pass)`", "latency": latency, "latency_quiet": quiet,
            "throughput": _throughput(THROUGHPUT_JOBS, seconds, THROUGHPUT_JOBS)}


def fork_floor() -> dict[str, Any] | None:
    if not hasattr(os, "fork"):
        return None

    def one() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    latency, quiet = _latencies(one, LATENCY_JOBS)
    t0 = time.perf_counter()
    running: list[int] = []
    for _ in range(THROUGHPUT_JOBS):
        if len(running) == FLOOR_PARALLEL:
            os.waitpid(running.pop(0), 0)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        running.append(pid)
    for pid in running:
        os.waitpid(pid, 0)
    seconds = time.perf_counter() - t0
    return {"system": "floor: `os.fork()` + exit + wait", "latency": latency,
            "latency_quiet": quiet,
            "throughput": _throughput(THROUGHPUT_JOBS, seconds, THROUGHPUT_JOBS)}


def _wait_final(client: httpx.Client, job_id: str, wait_s: float = 0) -> str:
    """Polled every POLL_S; with `wait_s`, Offload's blocking wait instead: each GET
    answers once the job has ended (or after `wait_s`)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        answer = client.get(f"/api/jobs/{job_id}", params={"wait_s": wait_s} if wait_s else None)
        state = str(answer.json()["state"])
        if state in p.FINAL_STATES:
            return state
        if not wait_s:
            time.sleep(POLL_S)
    raise TimeoutError(f"job {job_id} did not finish")


def _wait_ended(client: httpx.Client, job_id: str) -> str:
    return _wait_final(client, job_id, WAIT_S)


class CpuSeconds:
    """The CPU time used so far by each part of the path, each part's processes whole:
    the client (this process), the API, the supervisor, and the launcher with its
    runners (the fork server or the spares, each runner's time once it has exited)."""

    PARTS = ("client", "API", "supervisor", "launcher and runners")

    def __init__(self, api_pid: int) -> None:
        self.api = psutil.Process(api_pid)
        deadline = time.monotonic() + TIMEOUT_S  # the health answers before it is started
        while not (found := [child for child in self.api.children()
                             if "jobs.supervisor" in child.cmdline()]):
            if time.monotonic() > deadline:
                raise RuntimeError("the API started no supervisor")
            time.sleep(0.05)
        self.supervisor = found[0]

    def now(self) -> dict[str, float]:
        api, supervisor = self.api.cpu_times(), self.supervisor.cpu_times()
        launcher = supervisor.children_user + supervisor.children_system  # exited ones
        for child in self.supervisor.children():
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                launcher += (times.user + times.system + times.children_user
                             + times.children_system)
        return dict(zip(self.PARTS, (time.process_time(), api.user + api.system,
                                     supervisor.user + supervisor.system, launcher),
                        strict=True))

    def per_job(self, before: dict[str, float], jobs: int) -> dict[str, float]:
        """ms of CPU a job since `before`, by part."""
        after = self.now()
        return {part: (after[part] - before[part]) * 1000 / jobs for part in self.PARTS}


class _Offload:
    """A client's ways with one Offload over HTTP: submit, and wait for jobs."""

    def __init__(self, client: httpx.Client, batch: bool) -> None:
        self.client, self.batch = client, batch

    def submit_many(self, n: int) -> list[str]:
        if self.batch:
            answer = self.client.post("/api/jobs/batch", json={"jobs": [SLEEP_JOB] * n})
            answer.raise_for_status()
            return [str(job["id"]) for job in answer.json()["jobs"]]
        answers = [self.client.post("/api/jobs", json=SLEEP_JOB) for _ in range(n)]
        for answer in answers:
            answer.raise_for_status()
        return [str(answer.json()["id"]) for answer in answers]

    def one(self, wait: Callable[[httpx.Client, str], str] = _wait_final) -> None:
        state = wait(self.client, self.submit_many(1)[0])
        assert state == p.JobState.COMPLETED, state

    def all_of(self, wait: Callable[[httpx.Client, str], str] = _wait_final) -> int:
        ids = self.submit_many(THROUGHPUT_JOBS)
        return [wait(self.client, job_id) for job_id in ids].count(p.JobState.COMPLETED)

    def let_go(self, cpu: CpuSeconds) -> dict[str, Any]:
        """THROUGHPUT_JOBS stored with the queue paused, then let go (no client's requests
        meanwhile but the wait for the last): what the supervisor and the runners alone
        can do."""
        self.client.post("/api/queue/pause").raise_for_status()
        ids = self.submit_many(THROUGHPUT_JOBS)
        time.sleep(0.5)  # all stored, and seen by the supervisor
        started, before = time.perf_counter(), cpu.now()
        self.client.post("/api/queue/resume").raise_for_status()
        _wait_ended(self.client, ids[-1])
        seconds, cpu_ms = time.perf_counter() - started, cpu.per_job(before, len(ids))
        completed = [_wait_final(self.client, job_id) for job_id in ids].count(
            p.JobState.COMPLETED)
        return {"throughput": _throughput(len(ids), seconds, completed), "cpu_ms": cpu_ms}


@contextlib.contextmanager
def _offload_up(cap: int, extra_env: dict[str, str] | None = None,
                batch: bool = False) -> Iterator[tuple[_Offload, CpuSeconds]]:
    """Offload served by uvicorn with its own supervisor, warmed up; a client's ways with
    it, and the CPU of each part of its path."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-http-") as tmp:
        # A remote LLM named (never called): no embedded model server shares the cores.
        env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"), "OFFLOAD_MAX_CONCURRENT": str(cap),
               "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", **(extra_env or {})}
        args = ["-m", "uvicorn", "api_entry:app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]
        with _process(args, env, f"{url}/api/health") as api, \
                httpx.Client(base_url=url, timeout=60) as client:
            cpu = CpuSeconds(api.pid)
            offload = _Offload(client, batch)
            for _ in range(WARMUP_JOBS):  # the supervisor is up and its launcher warm
                offload.one()
            yield offload, cpu


def offload(cap: int, extra_env: dict[str, str] | None = None,
            label: str = "", batch: bool = False, released: bool = False) -> dict[str, Any]:
    """`batch`: jobs submitted through POST /api/jobs/batch (as RQ's enqueue_many), the
    throughput's all in one request, each latency's as a batch of one. `released`: also
    the jobs stored with the queue paused, then let go (`_Offload.let_go`)."""
    label += ", one batch request" if batch else ""
    with _offload_up(cap, extra_env, batch) as (up, cpu):
        latency, quiet = _latencies(up.one, LATENCY_JOBS)
        before = cpu.now()
        throughput = _timed(up.all_of)
        cpu_ms = cpu.per_job(before, THROUGHPUT_JOBS)
        waited = _series(lambda: up.one(_wait_ended), LATENCY_JOBS, 0.0)
        throughput_waited = _timed(lambda: up.all_of(_wait_ended))
        let_go_run = {"let_go": up.let_go(cpu)} if released else {}
    return {"system": f"Offload over HTTP, cap {cap}{label}", "latency": latency,
            "latency_quiet": quiet, "throughput": throughput, "latency_waited": waited,
            "throughput_waited": throughput_waited, "cpu_ms": cpu_ms, **let_go_run}


class _Peer(NamedTuple):
    """A peer's ways: `submit()` returns a handle that `result(handle)` waits on (polling
    every POLL_S), the no-op's True once done; `waited(handle)`, the peer's own blocking
    wait, where it has one."""

    submit: Callable[[], Any]
    result: Callable[[Any], Any]
    waited: Callable[[Any], Any] | None = None

    def one(self, wait: Callable[[Any], Any] | None = None) -> None:
        assert (wait or self.result)(self.submit()) is True

    def all_of(self, wait: Callable[[Any], Any] | None = None) -> int:
        pending = [self.submit() for _ in range(THROUGHPUT_JOBS)]
        return sum(1 for handle in pending if (wait or self.result)(handle) is True)

    def warm_up(self) -> None:  # the first waits for the workers to start
        for _ in range(WARMUP_JOBS):
            self.one()


def _peer_row(system: str, peer: _Peer) -> dict[str, Any]:
    """Latency and throughput of a peer, polled; then the same through its own wait."""
    peer.warm_up()
    latency, quiet = _latencies(peer.one, LATENCY_JOBS)
    row = {"system": system, "latency": latency, "latency_quiet": quiet,
           "throughput": _timed(peer.all_of)}
    if peer.waited is not None:
        waited = peer.waited
        row["latency_waited"] = _series(lambda: peer.one(waited), LATENCY_JOBS, 0.0)
        row["throughput_waited"] = _timed(lambda: peer.all_of(waited))
    return row


def _poll(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"the {what} task did not finish")


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
                _poll(lambda: pending.get() is not None, "Huey")
                return pending.get()  # kept by the handle once read

            row = _peer_row(f"Huey, SQLite, {HUEY_WORKERS} process workers",
                            _Peer(noop, result))
        app.storage.close()
    return row


def _wait_redis(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return
        if proc.poll() is not None:
            raise RuntimeError("redis-server exited")
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@contextlib.contextmanager
def _redis_server() -> Iterator[str]:
    """A redis-server of the bench's own (loopback, a free port, nothing saved); its URL."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="offload-bench-redis-") as tmp:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            _wait_redis(port, proc)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


RQ_SYSTEM = f"RQ, {RQ_WORKERS} fork-per-job workers (Redis)"


def _rq_installed() -> bool:
    return importlib.util.find_spec("rq") is not None


@contextlib.contextmanager
def _rq_up() -> Iterator[_Peer]:
    """RQ_WORKERS classic workers on a Redis of the bench's own; RQ's ways (not warmed
    up: the first job waits for the workers to start)."""
    from rq.job import JobStatus

    from bench.baselines import rq_app

    with _redis_server() as url, contextlib.ExitStack() as workers:
        queue = rq_app.connect(url)
        workers.callback(queue.connection.close)  # after the workers (a stack)
        # The classic Worker: it waits on a blocking pop (woken at once by an enqueue)
        # and forks a work-horse per job.
        args = ["-m", "rq.cli", "worker", "--url", url, "--worker-class", "rq.Worker",
                "--quiet", rq_app.QUEUE]
        for _ in range(RQ_WORKERS):
            workers.enter_context(_process(args, {}, None))

        def result(job: Any) -> Any:
            _poll(lambda: job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED), "RQ")
            return job.return_value()

        def waited(job: Any) -> Any:
            outcome = job.latest_result(timeout=WAIT_S)  # a blocking read of Redis
            return None if outcome is None else outcome.return_value

        yield _Peer(lambda: queue.enqueue(rq_app.noop), result, waited)


def rq() -> dict[str, Any] | None:
    if not _rq_installed():
        return None
    with _rq_up() as peer:
        return _peer_row(RQ_SYSTEM, peer)


def celery() -> dict[str, Any] | None:
    try:
        from bench.baselines import celery_app
    except ImportError:
        return None
    with _redis_server() as url:
        app, noop = celery_app.connect(url)
        # prefork (Celery's default pool) with one child per slot, as Offload's cap 2;
        # gossip, mingle and heartbeats talk to other workers, of which there are none.
        args = ["-m", "celery", "-A", "bench.baselines.celery_app:app", "worker",
                "--pool", "prefork", "-c", str(CELERY_PROCESSES), "-l", "warning",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with _process(args, {celery_app.URL_ENV: url}, None):

            def result(pending: Any) -> Any:
                _poll(pending.ready, "Celery")
                return pending.result

            row = _peer_row(f"Celery, prefork pool of {CELERY_PROCESSES} "
                            "(Redis; no process per job)",
                            _Peer(noop.delay, result,
                                  lambda pending: pending.get(timeout=WAIT_S)))  # pub/sub
        app.close()
    return row


def in_turns(rounds: int) -> dict[str, Any]:
    """The goals' ratios, each of the same minute. Up throughout: Offload at cap 2, at cap
    8, and at cap 2 with warm spares, and RQ. In each round: TURN_LATENCY_JOBS back to
    back on the spawn floor, on Offload's fork path (cap 2) and on its warm spares; then
    THROUGHPUT_JOBS (polled) on Offload at cap 2, at cap 8, and on RQ; each series in the
    other order every other round. This host's speed drifts from minute to minute more
    than the rows above differ, so a ratio across rows can mislead. An idle Offload still
    wakes (its index, its supervisor): the CPU the three take while RQ runs is measured
    too."""
    turns: list[dict[str, Any]] = []
    with contextlib.ExitStack() as up:
        offload, cpu = up.enter_context(_offload_up(CAPS[0]))
        cap8, cap8_cpu = up.enter_context(_offload_up(CAPS[1]))
        spares, spares_cpu = up.enter_context(_offload_up(CAPS[0], SPARES[0]))
        rq_peer = up.enter_context(_rq_up()) if _redis_server_here() and _rq_installed() else None
        if rq_peer is not None:
            rq_peer.warm_up()

        def rq_turn() -> dict[str, Any]:
            assert rq_peer is not None
            offloads = (cpu, cap8_cpu, spares_cpu)
            before = [each.now() for each in offloads]
            throughput = _timed(rq_peer.all_of)
            # Offload's processes, not the client (this process: RQ's client meanwhile).
            idle = sum(after[part] - earlier[part]
                       for each, earlier in zip(offloads, before, strict=True)
                       for after in [each.now()] for part in CpuSeconds.PARTS[1:])
            return {"rq_throughput": throughput,
                    "offload_idle_cores": idle / throughput["seconds"]}

        latencies = {"floor": lambda: _series(_spawn_one, TURN_LATENCY_JOBS, 0.0),
                     "offload": lambda: _series(offload.one, TURN_LATENCY_JOBS, 0.0),
                     "spares": lambda: _series(spares.one, TURN_LATENCY_JOBS, 0.0)}
        throughputs = [lambda: {"offload_throughput": _timed(offload.all_of)},
                       lambda: {"cap8_throughput": _timed(cap8.all_of)},
                       *([rq_turn] if rq_peer is not None else [])]
        for number in range(rounds):
            turn: dict[str, Any] = {}
            for name in _in_order(list(latencies), number):
                turn[name] = latencies[name]()
            for measure in _in_order(throughputs, number):
                turn.update(measure())
            turns.append(turn)
    return {"rounds": turns, "rq": rq_peer is not None}


def _in_order(items: list[T], number: int) -> list[T]:
    """`items` as given in even rounds, the other way round in odd ones."""
    return items if number % 2 == 0 else items[::-1]


def _redis_server_here() -> bool:
    return shutil.which("redis-server") is not None


def run() -> dict[str, Any]:
    rows = [spawn_floor(), fork_floor(), *(offload(cap, released=cap == CAPS[0]) for cap in CAPS),
            offload(2, *SPARES),
            offload(2, *NO_FSYNC), offload(2, batch=True),
            huey()]
    skipped: dict[str, str] = {}
    for name, peer in (("RQ", rq), ("Celery", celery)):
        if not _redis_server_here():
            skipped[name] = "skipped: no redis-server on the PATH"
            continue
        row = peer()
        if row is None:
            skipped[name] = "skipped: not installed (the `bench` extra)"
        else:
            rows.append(row)
    return {"rows": [row for row in rows if row is not None], "skipped": skipped,
            "in_turns": in_turns(TURNS),
            "latency_jobs": LATENCY_JOBS, "throughput_jobs": THROUGHPUT_JOBS,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}


def report(results: dict[str, Any]) -> str:
    rows = results["rows"]
    floor = rows[0]
    rows_md = ["| system | jobs/s | idle latency median (ms) | p90 (ms) "
               f"| after {IDLE_GAP_S:g} s quiet: median (ms) | p90 (ms) "
               "| jobs/s vs spawn floor | latency vs spawn floor (back to back, quiet) "
               "| blocking wait: jobs/s | its latency median (ms) |",
               "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        thr, lat, quiet = r["throughput"], r["latency"], r["latency_quiet"]
        waited = "| - | - |"
        if "throughput_waited" in r:
            waited = (f"| {_jobs_per_s(r['throughput_waited'])} "
                      f"| {r['latency_waited']['median'] * 1000:.1f} |")
        rows_md.append(
            f"| {r['system']} | {_jobs_per_s(thr)} | {lat['median'] * 1000:.1f} "
            f"| {lat['p90'] * 1000:.1f} | {quiet['median'] * 1000:.1f} "
            f"| {quiet['p90'] * 1000:.1f} "
            f"| {thr['jobs_per_s'] / floor['throughput']['jobs_per_s']:.2f}x "
            f"| {lat['median'] / floor['latency']['median']:.2f}x, "
            f"{quiet['median'] / floor['latency_quiet']['median']:.2f}x {waited}")
    rows_md.append("")
    rows_md.append(f"Latency: {results['latency_jobs']} no-op jobs one at a time, submit -> "
                   f"final state seen (polled every {POLL_S * 1000:g} ms), back to back, then "
                   f"each after {IDLE_GAP_S:g} s of quiet; throughput: "
                   f"{results['throughput_jobs']} submitted by one client, until all are final. "
                   "`one batch request`: those all in one `POST /api/jobs/batch` (as RQ's "
                   "`enqueue_many`), and each latency's job a batch of one. "
                   "Blocking wait: the same throughput, and latency back to back, each job "
                   "waited on by the system's own way of waiting without polling: Offload's "
                   "`GET /api/jobs/{id}?wait_s=`, RQ's `Job.latest_result(timeout=)`, Celery's "
                   "`AsyncResult.get()` (Huey has none but polling). "
                   "Offload fsyncs each submission, claim and final state; Huey (SQLite, its "
                   "default `fsync=False`) and the bench's Redis (no saving) do not.")
    for name, why in results["skipped"].items():
        rows_md.append(f"\n{name}: {why}")
    if "in_turns" in results:
        rows_md += ["", *_in_turns_table(results["in_turns"])]
    rows_md += ["", *_where_the_cpu_goes(rows, results.get("cores") or 1)]
    return "\n".join(rows_md)


def _in_turns_table(in_turns: dict[str, Any]) -> list[str]:
    """Each round of `in_turns`, and the median of the rounds' ratios: latency, then
    throughput."""
    rounds = in_turns["rounds"]
    with_rq = in_turns["rq"]
    latency_jobs, jobs = rounds[0]["floor"]["n"], rounds[0]["offload_throughput"]["jobs"]
    lines = [f"The goals' ratios measured in turns ({len(rounds)} rounds; Offload at cap "
             f"{CAPS[0]}, at cap {CAPS[1]} and at cap {CAPS[0]} with warm spares"
             f"{' and RQ' if with_rq else ''} up throughout; in each round {latency_jobs} "
             "jobs back to back on the spawn floor, on Offload's fork path and on its warm "
             f"spares, then {jobs} jobs on Offload at cap {CAPS[0]} and at cap {CAPS[1]}"
             f"{' and on RQ' if with_rq else ''}, polled every {POLL_S * 1000:g} ms; each "
             "series in the other order every other round):",
             "", f"| round | spawn floor: median (ms) | Offload, cap {CAPS[0]} (ms) "
             "| latency vs floor | warm spares (ms) | warm spares vs the fork path |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    ratios: dict[str, list[float]] = {"floor": [], "spares": [], "cap8": [], "rq": []}

    def ratio(name: str, value: float) -> str:
        ratios[name].append(value)
        return f"{value:.2f}x"

    def median(name: str) -> str:
        return f"{statistics.median(ratios[name]):.2f}x" if ratios[name] else "-"

    for number, turn in enumerate(rounds, 1):
        floor_ms, offload_ms = turn["floor"]["median"], turn["offload"]["median"]
        spares_ms = turn["spares"]["median"]
        lines.append(f"| {number} | {floor_ms * 1000:.1f} | {offload_ms * 1000:.1f} "
                     f"| {ratio('floor', offload_ms / floor_ms)} | {spares_ms * 1000:.1f} "
                     f"| {ratio('spares', spares_ms / offload_ms)} |")
    lines += [f"| median of the rounds | | | {median('floor')} | | {median('spares')} |", "",
              f"| round | Offload, cap {CAPS[0]}: jobs/s | cap {CAPS[1]}: jobs/s "
              f"| cap {CAPS[1]} vs cap {CAPS[0]} | RQ: jobs/s | cap {CAPS[0]} vs RQ "
              "| idle Offloads' CPU while RQ ran (cores) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for number, turn in enumerate(rounds, 1):
        cap2, cap8 = turn["offload_throughput"], turn["cap8_throughput"]
        rq_jobs, versus, idle = "-", "-", "-"
        if "rq_throughput" in turn:
            rq_jobs = _jobs_per_s(turn["rq_throughput"])
            versus = ratio("rq", cap2["jobs_per_s"] / turn["rq_throughput"]["jobs_per_s"])
            idle = f"{turn['offload_idle_cores']:.3f}"
        lines.append(f"| {number} | {_jobs_per_s(cap2)} | {_jobs_per_s(cap8)} "
                     f"| {ratio('cap8', cap8['jobs_per_s'] / cap2['jobs_per_s'])} "
                     f"| {rq_jobs} | {versus} | {idle} |")
    lines.append(f"| median of the rounds | | | {median('cap8')} | | {median('rq')} | |")
    if not with_rq:
        lines.append("\nRQ: not measured in turns (no redis-server on the PATH, or RQ not "
                     "installed)")
    return lines


def _where_the_cpu_goes(rows: list[dict[str, Any]], cores: int) -> list[str]:
    """The CPU a job took in each Offload row's throughput run, by part of the path; and
    the jobs/s that CPU allows on this machine's cores, beside the jobs/s measured."""
    lines = ["Where the CPU goes: ms of CPU a job in each Offload row's throughput run (polled "
             f"every {POLL_S * 1000:g} ms), by process; and the jobs/s that CPU allows on "
             f"this machine's {cores} cores, were they never idle.", "",
             f"| Offload | {' | '.join(CpuSeconds.PARTS)} | total | jobs/s allowed | measured |",
             f"| --- |{' ---: |' * (len(CpuSeconds.PARTS) + 3)}"]
    measured = [(row["system"].removeprefix("Offload over HTTP, "), row["cpu_ms"],
                 row["throughput"]) for row in rows if "cpu_ms" in row]
    measured += [(f"{name}, jobs stored on a paused queue, then let go", row["let_go"]["cpu_ms"],
                  row["let_go"]["throughput"])
                 for row in rows if "let_go" in row
                 for name in [row["system"].removeprefix("Offload over HTTP, ")]]
    for name, cpu_ms, throughput in measured:
        total = sum(cpu_ms.values())
        lines.append(f"| {name} | {' | '.join(f'{cpu_ms[part]:.1f}' for part in CpuSeconds.PARTS)} "
                     f"| {total:.1f} | {cores * 1000 / total:.0f} "
                     f"| {_jobs_per_s(throughput)} |")
    return lines


def _jobs_per_s(throughput: dict[str, Any]) -> str:
    done = throughput["completed"]
    return f"{throughput['jobs_per_s']:.0f}" + (
        "" if done == throughput["jobs"] else f" ({done} completed)")
