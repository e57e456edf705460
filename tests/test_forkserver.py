"""Runners forked by the fork server (Linux): what a user sees of them is what they see
of a runner started as a new interpreter."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobs import forkserver
from jobs import protocol as p
from jobs.kinds import KINDS
from jobs.launchers import LocalLauncher, LocalRun
from jobs.store import JobStore
from tests.conftest import ROOT, process_gone, wait_for

pytestmark = pytest.mark.skipif(not forkserver.AVAILABLE, reason="the fork server is Linux only")

Start = Callable[..., tuple[LocalRun, Path, threading.Event]]


@pytest.fixture
def launcher() -> Iterator[LocalLauncher]:
    each = LocalLauncher(fork_server=True)
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
        run = launcher.start(KINDS[kind], job_file, job, ended.set)
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
            if "jobs.forkserver" in " ".join(proc.info["cmdline"] or [])
            and proc.info["cmdline"][0] == sys.executable]


def test_a_forked_runner_looks_and_behaves_like_a_started_one(start: Start) -> None:
    run, job_file, ended = start(seconds=1.0, steps=2)
    proc = psutil.Process(run.runner.pid)
    shown = wait_for(lambda: shows_runner(proc.pid), what="the runner's command line")
    assert shown == [sys.executable, "-m", "runners.sleep", "--job-file", str(job_file)]
    parent = proc.parent()
    assert parent is not None and "jobs.forkserver" in parent.cmdline()
    assert os.getpgid(proc.pid) == proc.pid  # its own group: killpg stops its tree
    assert os.sched_getscheduler(proc.pid) == os.SCHED_IDLE
    assert proc.cwd() == str(ROOT)
    assert ended.wait(30)
    assert run.runner.child is not None and run.runner.child.returncode == 0
    job = p.read_json(job_file)
    assert job is not None and job[p.F_STATE] == p.COMPLETED
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
        assert job is not None and job[p.F_STATE] == p.COMPLETED
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
    assert job is not None and job[p.F_STATE] == p.COMPLETED
    run, job_file, ended = start(seconds=0)  # a new server
    assert ended.wait(30)
    assert run.runner.child is not None and run.runner.child.returncode == 0
    assert wait_for(lambda: p.read_json(job_file), what="job file")[p.F_STATE] == p.COMPLETED


def test_the_fork_server_leaves_with_its_launcher(start: Start,
                                                  launcher: LocalLauncher) -> None:
    run, _, ended = start(seconds=1.0)
    (server,) = [proc for proc in fork_servers()
                 if run.runner.pid in [c.pid for c in proc.children()]]
    launcher.close()
    server.wait(10)
    assert not process_gone(run.runner.pid)  # runners run on; a new supervisor adopts them
    assert ended.wait(30)


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
