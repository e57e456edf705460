"""Runners forked by the fork server (Linux): what a user sees of them is what they see
of a runner started as a new interpreter."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.kinds import runner_modules
from jobs.launch import fork_child, fork_client, forkserver, pids, processes
from jobs.launch.local import FORK, LocalLauncher, LocalRun
from jobs.protocol.wake import OUTPUT_FILE
from jobs.store.job_store import JobStore
from tests.conftest import ROOT, process_gone, wait_for
from tests.fake_llm import FakeLLM
from tests.tracing import TracedServer, parse

pytestmark = pytest.mark.skipif(not fork_client.AVAILABLE, reason="the fork server is Linux only")

Start = Callable[..., tuple[LocalRun, Path, threading.Event]]


@pytest.fixture
def launcher() -> Iterator[LocalLauncher]:
    each = LocalLauncher(mode=FORK)
    yield each
    each.close()


@pytest.fixture
def start(data_dir: Path, launcher: LocalLauncher) -> Start:
    store = JobStore(data_dir / "jobs")

    def start_job(kind: str = "sleep",
                  **job_input: Any) -> tuple[LocalRun, Path, threading.Event]:
        job = store.create(kind, job_input, 60)
        job_file = store.path(job["id"])
        ended = threading.Event()
        run = launcher.start(runner_modules()[kind], job_file, job, ended.set)
        assert isinstance(run, LocalRun)
        return run, job_file, ended

    return start_job


def raw_command_line(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def shows_runner(pid: int) -> list[str] | None:
    """Its command line once it shows the runner (a forked child writes it first thing)."""
    cmdline = psutil.Process(pid).cmdline()
    return cmdline if "runners.sleep" in cmdline else None


def fork_servers() -> list[psutil.Process]:
    return [proc for proc in psutil.process_iter(["cmdline"])
            if "jobs.launch.forkserver" in " ".join(proc.info["cmdline"] or [])
            and proc.info["cmdline"][0] == sys.executable]


def test_a_forked_runner_looks_and_behaves_like_a_started_one(start: Start) -> None:
    run, job_file, ended = start(seconds=1.0, steps=2)
    proc = psutil.Process(run.runner.pid)
    shown = wait_for(lambda: shows_runner(proc.pid), what="the runner's command line")
    assert shown == [sys.executable, "-m", "runners.sleep", "--job-file", str(job_file)]
    parent = proc.parent()
    assert parent is not None and "jobs.launch.forkserver" in parent.cmdline()
    assert os.getpgid(proc.pid) == proc.pid  # its own group: killpg stops its tree
    assert os.sched_getscheduler(proc.pid) == os.SCHED_IDLE
    assert proc.cwd() == str(ROOT)
    assert ended.wait(30)
    assert run.runner.child is not None and run.runner.child.returncode == 0
    job = p.read_json(job_file)
    assert job is not None and job[p.F_STATE] == p.JobState.COMPLETED
    assert "Warning" not in Path(p.sibling(job_file, p.LOG_FILE)).read_text()
    crashing, _, ended = start("probe", exit_code=7)
    assert ended.wait(30)
    assert crashing.runner.child is not None and crashing.runner.child.returncode == 7


def test_an_edited_project_file_makes_the_next_runner_a_fresh_interpreter(
        start: Start) -> None:
    run, _, ended = start(seconds=0.5)
    # Forked: one title written over the arguments, spaces between them.
    wait_for(lambda: shows_runner(run.runner.pid), what="the runner's command line")
    assert b" -m runners.sleep " in raw_command_line(run.runner.pid)
    assert ended.wait(30)
    edited = ROOT / "runners" / "sleep.py"
    before = edited.stat()
    try:
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        run, job_file, ended = start(seconds=0.5)
        # exec'd: a real argument vector, NUL after each argument.
        wait_for(lambda: shows_runner(run.runner.pid), what="the runner's command line")
        assert b"\0-m\0runners.sleep\0" in raw_command_line(run.runner.pid)
        assert ended.wait(30)
        job = p.read_json(job_file)
        assert job is not None and job[p.F_STATE] == p.JobState.COMPLETED
    finally:
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_runners_outlive_a_killed_fork_server_which_comes_back(start: Start) -> None:
    run, job_file, ended = start(seconds=2.0, steps=4)
    (server,) = [proc for proc in fork_servers()
                 if run.runner.pid in [c.pid for c in proc.children()]]
    server.kill()
    server.wait(10)
    assert not process_gone(run.runner.pid)
    assert ended.wait(30)  # noticed without the server: polled until gone
    job = p.read_json(job_file)
    assert job is not None and job[p.F_STATE] == p.JobState.COMPLETED
    run, job_file, ended = start(seconds=0)  # a new server
    assert ended.wait(30)
    assert run.runner.child is not None and run.runner.child.returncode == 0
    final = wait_for(lambda: p.read_json(job_file), what="job file")
    assert final[p.F_STATE] == p.JobState.COMPLETED


def test_the_fork_server_leaves_with_its_launcher(start: Start,
                                                  launcher: LocalLauncher) -> None:
    run, _, ended = start(seconds=1.0)
    (server,) = [proc for proc in fork_servers()
                 if run.runner.pid in [c.pid for c in proc.children()]]
    ahead = wait_for(lambda: waiting_child(server, run.runner.pid), what="a child forked ahead")
    launcher.close()
    server.wait(10)
    assert not process_gone(run.runner.pid)  # runners run on; a new supervisor adopts them
    assert ended.wait(30)
    wait_for(lambda: process_gone(ahead.pid), 10, what="the child forked ahead to leave")


def waiting_child(server: psutil.Process, *runners: int) -> psutil.Process | None:
    """The fork server's one child that is no runner: forked ahead, waiting for a job."""
    others = [child for child in server.children() if child.pid not in runners]
    return others[0] if len(others) == 1 else None


def test_the_next_runner_is_forked_ahead_and_takes_the_next_job(
        make_server: Callable[..., Any]) -> None:
    server = make_server()
    jobs_dir = server.data_dir / "jobs"
    with server.client() as client:
        job_id = submit(client, seconds=1, steps=1)
        launched(jobs_dir, job_id)
        record = p.read_json(jobs_dir / job_id / p.RUN_FILE)
        assert record is not None
        first = psutil.Process(record["pid"])
        fork_server = first.parent()
        assert fork_server is not None
        assert final(client, job_id)["state"] == p.JobState.COMPLETED
        # Idle now: a child waits, forked before any job named it, and runs the next one.
        ahead = wait_for(lambda: waiting_child(fork_server), what="a child forked ahead")
        assert ahead.create_time() < time.time()
        job_id = submit(client, seconds=0)
        job = final(client, job_id)
        assert job["state"] == p.JobState.COMPLETED and job["pid"] == ahead.pid, job
        wait_for(lambda: process_gone(ahead.pid), what="the runner to end")
        # One that dies waiting (the OOM killer, a kill by hand) is replaced, unreported.
        ahead = wait_for(lambda: waiting_child(fork_server), what="the next child forked ahead")
        ahead.kill()
        def another() -> psutil.Process | None:
            child = waiting_child(fork_server)
            return child if child is not None and child.pid != ahead.pid else None

        replaced = wait_for(another, what="a child forked again")
        job_id = submit(client, seconds=0)
        job = final(client, job_id)
        assert job["state"] == p.JobState.COMPLETED and job["pid"] == replaced.pid, job


def _traced_jobs(strace: str, trace: Path, data_dir: Path, tmp_path: Path,
                 llm_url: str) -> list[dict[str, Any]]:
    """Two sleep jobs and a chat, run by a server whose processes strace follows."""
    server = TracedServer(strace, trace, "openat,execve", data_dir, tmp_path / "server.log",
                          {"OPENAI_BASE_URL": llm_url})
    jobs = []
    try:
        server.start(timeout=120)
        with server.client() as client:
            for _ in range(2):  # the first forked ahead at the server's start, the next after it
                # 0 s: every write of the job is its main thread's, whose tid is its pid
                job_id = submit(client, seconds=0, steps=2)
                jobs.append(final(client, job_id))
            # A chat connects by name or address: the `idna` codec that takes its host was
            # loaded by each chat runner (with `stringprep` and `unicodedata`).
            chat = client.post("/api/jobs", json={"kind": "chat", "input": {"messages": [
                {"role": "user", "content": "hi"}]}})
            assert chat.status_code == 202, chat.text
            jobs.append(final(client, chat.json()["id"]))
    finally:
        server.stop()
    return jobs


@pytest.mark.timeout(300)
def test_a_forked_runner_loads_no_module(strace: str, data_dir: Path,
                                         tmp_path: Path) -> None:
    """What runners need is loaded in the fork server once: a module a forked runner
    loads, it loads for every job (`resource`, read for a job's peak RSS, was; and its
    own module, which runpy read again for each job)."""
    trace = tmp_path / "strace.txt"
    with FakeLLM(pieces=["a ", "reply"]) as llm:  # a chat's connection, not a model
        jobs = _traced_jobs(strace, trace, data_dir, tmp_path, llm.base_url)
    calls = parse(trace.read_text())
    for job in jobs:
        assert job["state"] == p.JobState.COMPLETED, job
        assert not [c for c in calls if c.tid == job["pid"] and c.name == "execve"], (
            "the runner was not forked: it exec'd a new interpreter")
        opened = [c.text for c in calls if c.tid == job["pid"] and c.name == "openat"]
        assert any(job["id"] in text for text in opened), "the runner is not in the trace"
        modules = [text for text in opened if re.search(r'\.(so|py|pyc)"', text)]
        assert not modules, modules


def test_without_the_fork_server_runners_start_as_new_interpreters(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_FORK_SERVER", "0")
    each = LocalLauncher()
    store = JobStore(data_dir / "jobs")
    job = store.create("sleep", {"seconds": 0.5}, 60)
    ended = threading.Event()
    run = each.start("runners.sleep", store.path(job["id"]), job, ended.set)
    assert isinstance(run, LocalRun)
    wait_for(lambda: shows_runner(run.runner.pid), what="the runner's command line")
    assert b"\0-m\0runners.sleep\0" in raw_command_line(run.runner.pid)
    assert psutil.Process(run.runner.pid).ppid() == os.getpid()
    assert ended.wait(30)
    each.close()


class Runners:
    """Every process that shows a job file on its command line (a runner of that job),
    sampled from submission until `stop()`."""

    def __init__(self, job_file: Path) -> None:
        self.job_file = str(job_file)
        self.seen: set[tuple[int, float]] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def alive(self) -> list[psutil.Process]:
        return [proc for proc in psutil.process_iter(["cmdline", "create_time"])
                if self.job_file in (proc.info["cmdline"] or [])]

    def _sample(self) -> None:
        while not self._done.is_set():
            self.seen.update((proc.pid, proc.info["create_time"]) for proc in self.alive())
            self._done.wait(0.02)

    def stop(self) -> set[tuple[int, float]]:
        self._done.set()
        self._thread.join(10)
        return self.seen


def submit(client: httpx.Client, kind: str = "sleep", **job_input: Any) -> str:
    job_id: str = client.post("/api/jobs", json={"kind": kind, "input": job_input}).json()["id"]
    return job_id


def submit_watched(client: httpx.Client, jobs_dir: Path, **job_input: Any,
                   ) -> tuple[str, Runners]:
    """A job, and its runners sampled until `ran_once` (a sampler left running would
    list every process 50 times a second for the rest of the session)."""
    job_id = submit(client, **job_input)
    return job_id, Runners(jobs_dir / job_id / p.JOB_FILE)


def launched(jobs_dir: Path, job_id: str) -> None:
    """Until the supervisor's spawn has returned (it then records the runner's pid)."""
    run_file = jobs_dir / job_id / p.RUN_FILE
    wait_for(lambda: (p.read_json(run_file) or {}).get("pid"), 60, 0.05, "the launch record")


def final(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in p.FINAL_STATES else None

    return wait_for(check, 60, 0.1, f"job {job_id} to finish")


def ran_once(runners: Runners, job: dict[str, Any]) -> None:
    """Exactly one runner ran the job, and none is left (killed here if one is)."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not runners.alive(), 30, 0.1, "no runner of the job left")
    survivors = runners.alive()
    for proc in survivors:
        proc.kill()
    seen = runners.stop()
    assert not survivors, f"runners left after the job ended: {survivors}"
    assert len(seen) == 1, f"{len(seen)} runners of one job: {sorted(seen)}"
    assert [pid for pid, _ in seen] == [job["pid"]]


FAULTS = ["die_after_fork", pytest.param("stall_after_fork", marks=pytest.mark.slow)]


def faulty_server(make_server: Callable[..., Any], fault: str) -> tuple[Any, Path]:
    server = make_server(env={forkserver.TEST_FAULT_ENV: fault})
    return server, server.data_dir / "jobs"


def fault_happened(server: Any, fault: str) -> bool:
    # The fork server says so on its stderr: the supervisor process's output file.
    return f"test fault {fault}" in (server.data_dir / OUTPUT_FILE).read_text()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fork_server_lost_after_forking_runs_the_job_once(
        make_server: Callable[..., Any], fault: str) -> None:
    server, jobs_dir = faulty_server(make_server, fault)
    with server.client() as client:
        # Forked by a fresh server, which then fails: the runner ends without a final
        # state, and its exit code went with the server.
        job_id = submit(client, "probe", exit_code=7)
        job = final(client, job_id)
        assert job["state"] == p.JobState.FAILED and job["error"]["type"] == p.ErrorType.LOST, job
        assert job["exit_code"] is None and "exit code unknown" in job["error"]["message"]
        # die: forked by the next server, which dies too; stall: the stalled server
        # answers nothing and is stopped, so it is started as a new interpreter, once.
        job_id, runners = submit_watched(client, jobs_dir, seconds=2, steps=2)
        launched(jobs_dir, job_id)
        job = final(client, job_id)
        assert job["state"] == p.JobState.COMPLETED, job
        ran_once(runners, job)
        assert client.get(f"/api/jobs/{job_id}").json()["finished_at"] == job["finished_at"]
    assert fault_happened(server, fault)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fork_server_lost_after_forking_leaves_no_runner_after_a_cancel(
        make_server: Callable[..., Any], fault: str) -> None:
    server, jobs_dir = faulty_server(make_server, fault)
    with server.client() as client:
        job_id, runners = submit_watched(client, jobs_dir, seconds=60, steps=60)
        launched(jobs_dir, job_id)
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["state"] == p.JobState.RUNNING,
                 30, 0.1, "the job to run")
        # Seen by the sampler before the cancel: a runner stopped within its first few
        # milliseconds could live between two samples.
        wait_for(lambda: runners.seen, 30, 0.02, "the runner to be sampled")
        assert client.delete(f"/api/jobs/{job_id}").status_code == 200
        job = final(client, job_id)
        assert job["state"] == p.JobState.CANCELLED, job
        ran_once(runners, job)  # nothing survives to overwrite the cancelled state
        assert client.get(f"/api/jobs/{job_id}").json()["state"] == p.JobState.CANCELLED
    assert fault_happened(server, fault)


@pytest.fixture
def fork_server() -> Iterator[fork_client.ForkServer]:
    """A fork server as a supervisor keeps one, without the supervisor."""
    server = fork_client.ForkServer(processes.runner_env())
    yield server
    server.close()


def blocked(proc: psutil.Process) -> bool:
    return proc.status() == psutil.STATUS_SLEEPING


def spawn_sleep(server: fork_client.ForkServer, folder: Path, name: str,
                log: str | None = None, claim: dict[str, Any] | None = None) -> fork_client.Forked:
    job = p.new_job(p.new_id(), "sleep", {"seconds": 0}, 60)
    job_file = folder / name / p.JOB_FILE
    job_file.parent.mkdir()
    p.write_json(job_file, job)
    if claim is not None:
        p.write_json(job_file.parent / p.RUN_FILE, claim)
    return server.spawn("runners.sleep", job_file, log or str(job_file.parent / p.LOG_FILE))


def idle_scheduled(pid: int) -> bool:
    return os.sched_getscheduler(pid) == os.SCHED_IDLE


def test_a_child_forked_ahead_answers_at_once_on_a_busy_machine(
        fork_server: fork_client.ForkServer, tmp_path: Path) -> None:
    # The supervisor waits for the child's answer (one spawn at a time; the server is
    # killed after REPLY_TIMEOUT_S): a child that waited at SCHED_IDLE answered seconds
    # late whenever normal work took the CPU.
    cpu = min(os.sched_getaffinity(0))
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # the fork server and its children inherit it
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(8)]
    try:
        fork_server.ensure_started()
        assert fork_server._proc is not None
        server = psutil.Process(fork_server._proc.pid)
        runners: list[fork_client.Forked] = []
        for n in range(3):
            ahead = wait_for(lambda: waiting_child(server, *[r.pid for r in runners]),
                             what="a child forked ahead")
            # Waiting (blocked on its pipe), not idle-scheduled.
            wait_for(functools.partial(blocked, ahead), what="it to wait")
            assert os.sched_getscheduler(ahead.pid) != os.SCHED_IDLE
            started = time.monotonic()
            runners.append(spawn_sleep(fork_server, tmp_path, f"job{n}"))
            took = time.monotonic() - started
            assert runners[-1].pid == ahead.pid and took < 2.0, took
            # Once it has its job, a runner: the lowest priority, taken right after its
            # answer (which the supervisor waits for).
            wait_for(functools.partial(idle_scheduled, ahead.pid),
                     what="it to run at the lowest priority")
        assert fork_server._proc.poll() is None  # never stopped for being slow
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        os.sched_setaffinity(0, affinity)
    assert [runner.wait() for runner in runners] == [0, 0, 0]


def pipes(pid: int) -> set[str]:
    """The pipes a process holds, by inode."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("pipe:"):
                found.add(target)
    return found


def test_a_runner_waits_for_the_word_that_its_claim_is_on_disk(
        strace: str, fork_server: fork_client.ForkServer, tmp_path: Path) -> None:
    # The supervisor claims a job in the name of the child forked ahead, syncs the claim
    # while that child starts, and tells its runner through the fork server, which
    # then runs the job without syncing it again; told that it is not on disk (the
    # sync failed, or the server is gone), the runner syncs it itself before anything.
    fork_server.ensure_started()
    assert fork_server._proc is not None
    server = psutil.Process(fork_server._proc.pid)
    for n, durable in enumerate((True, False)):
        ahead = wait_for(lambda: waiting_child(server), what="a child forked ahead")
        announced = wait_for(fork_server.ahead, what="the child announced")
        # Against the boot time the server's pids take (psutil's moves with a clock step).
        assert announced == (ahead.pid, pids.created(ahead.pid))
        runner = spawn_sleep(fork_server, tmp_path, f"job{n}", claim={"pid": ahead.pid})
        assert runner.pid == ahead.pid and fork_server.ahead() != announced
        job_file = tmp_path / f"job{n}" / p.JOB_FILE
        trace = tmp_path / f"runner{n}.txt"
        tracer = subprocess.Popen([strace, "-y", "-o", str(trace), "-e", "trace=fsync,fdatasync",
                                   "-p", str(runner.pid)], stderr=subprocess.PIPE, text=True)
        try:
            assert tracer.stderr is not None
            assert "attached" in tracer.stderr.readline()
            # The next child, forked while this one waits, cannot speak for the server.
            following = wait_for(lambda: waiting_child(server, runner.pid),  # noqa: B023
                                 what="the next child forked ahead")
            # Once it has left the server's reply pipe (shared by every child until it
            # answers), the pipe it waits on for the word is all it holds.
            word = wait_for(lambda: pipes(runner.pid) if len(pipes(runner.pid)) == 1  # noqa: B023
                            else None, what="the runner holding its word's pipe alone")
            assert not word & pipes(following.pid)
            job = p.read_json(job_file)
            assert job is not None and job["state"] == p.JobState.QUEUED, "it did not wait"
            fork_server.tell_claim(runner, durable)
            assert runner.wait() == 0 and not runner.lost
        finally:
            tracer.communicate(timeout=30)
        job = p.read_json(job_file)
        assert job is not None and job["state"] == p.JobState.COMPLETED, job
        synced = [line for line in trace.read_text().splitlines()
                  if re.match(r"f(data)?sync\(\d+<.*/run\.json>", line)]
        assert bool(synced) is not durable, trace.read_text()


def test_a_fork_server_that_cannot_fork_ahead_serves_on(
        fork_server: fork_client.ForkServer, tmp_path: Path) -> None:
    # A fork ahead is asked for by no request: its failure (no fd, no memory, no pid
    # left for now) is nobody's answer, and must not end the server (and with it the
    # exit codes of its runners).
    fork_server.ensure_started()
    assert fork_server._proc is not None
    server = psutil.Process(fork_server._proc.pid)
    ahead = wait_for(lambda: waiting_child(server), what="a child forked ahead")
    limits = server.rlimit(psutil.RLIMIT_NOFILE)
    # Once the waiting child's pipe is closed, no room for the next child's.
    server.rlimit(psutil.RLIMIT_NOFILE, (server.num_fds(), limits[1]))
    first = spawn_sleep(fork_server, tmp_path, "first")
    assert first.pid == ahead.pid
    time.sleep(10 * forkserver.AHEAD_DELAY_S + 0.5)
    assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    assert not waiting_child(server, first.pid)
    server.rlimit(psutil.RLIMIT_NOFILE, limits)
    second = spawn_sleep(fork_server, tmp_path, "second")  # forked for it, then one ahead
    assert [first.wait(), second.wait()] == [0, 0] and not first.lost and not second.lost
    wait_for(lambda: waiting_child(server, first.pid, second.pid), what="a child forked ahead")
    assert fork_server._proc.pid == server.pid


def test_a_child_forked_ahead_that_cannot_start_says_so_at_once(
        fork_server: fork_client.ForkServer, tmp_path: Path) -> None:
    # The server used to open the job's log and answer an error itself; a child forked
    # ahead opens it, and must answer the error too: silence held the supervisor
    # REPLY_TIMEOUT_S, then the server (and its runners' exit codes) was killed.
    fork_server.ensure_started()
    assert fork_server._proc is not None
    server = psutil.Process(fork_server._proc.pid)
    ahead = wait_for(lambda: waiting_child(server), what="a child forked ahead")
    started = time.monotonic()
    with pytest.raises(fork_client.ForkServerError, match="No such file or directory"):
        spawn_sleep(fork_server, tmp_path, "job", str(tmp_path / "gone" / p.LOG_FILE))
    assert time.monotonic() - started < fork_client.REPLY_TIMEOUT_S / 2
    assert process_gone(ahead.pid) or wait_for(lambda: process_gone(ahead.pid))
    assert fork_server._proc.pid == server.pid and fork_server._proc.poll() is None
    forked = spawn_sleep(fork_server, tmp_path, "next")
    assert forked.wait() == 0 and not forked.lost
    # Reported before the next one's: its exit is not kept for a later runner with its pid.
    assert ahead.pid not in fork_server._exits


def test_a_request_line_reaches_its_child_whole_or_not_at_all(tmp_path: Path) -> None:
    # A line longer than PIPE_BUF (long, non-ASCII paths: JSON writes each character as
    # \uXXXX) can be written in part when a signal comes while the pipe is full.
    to_child_r, to_child_w = os.pipe()
    fcntl.fcntl(to_child_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # one page
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; time.sleep(0.5); sys.stdout.buffer.write(sys.stdin.buffer.read())"],
        stdin=to_child_r, stdout=subprocess.PIPE)
    os.close(to_child_r)
    folder = "/".join(["\u6570\u636e" * 40] * 5)  # about 2.4 kB as JSON, per path
    line = json.dumps({"module": "runners.sleep", "job_file": f"/{folder}/job.json",
                       "log": f"/{folder}/log.txt"}).encode()
    assert len(line) > fork_child.PIPE_BUF
    main = threading.get_ident()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    ringer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGUSR1))  # as a SIGCHLD
    ringer.start()
    ahead = fork_child.Ahead(child.pid, to_child_w)
    try:
        handed = ahead.hand(line, None)
    finally:
        ahead.close()  # handed, it would wait on for the word on its claim
        ringer.join()
        signal.signal(signal.SIGUSR1, previous)
    received, _ = child.communicate(timeout=30)
    assert received == (line + b"\n" if handed else b""), (handed, len(received))


def test_a_fork_server_whose_supervisor_left_before_it_was_ready_leaves_quietly() -> None:
    # Its "ready" to a closed pipe was a BrokenPipeError traceback in supervisor.out.
    with subprocess.Popen([sys.executable, "-m", "jobs.launch.forkserver"], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the supervisor is gone while the server imports the runners
        said = proc.stderr.read().decode(errors="replace")
        code = proc.wait(60)
    assert code == 0 and "Traceback" not in said, said
