"""What the supervisor asks of whatever runs its runners: the interface, and the
local launcher (runners as subprocesses of this machine, `jobs.launch.processes`).

A launcher starts a runner idempotently per job id, tells whether it still runs,
keeps the local job file in step with it, stops it with a grace period, and releases
what the engine keeps of it once the local job file is final. Choose one with
`OFFLOAD_LAUNCHER=local|ray`; the launch record `run.json` names the launcher that
started a job, so a new supervisor adopts it with the same one.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.launch import forkserver, processes
from jobs.launch.pids import find

OnExit = Callable[[], None]
_ADOPT_START_TOLERANCE_S = 5.0
log = logging.getLogger(__name__)


class ClaimFailed(OSError):
    """The launch claim (run.json) cannot be written: the data folder is unwritable for
    now, so the job stays queued and nothing starts that could not record itself."""


def claim(run_file: str, record: dict[str, Any]) -> None:
    try:
        p.write_json(run_file, record, durable=True)
    except OSError as exc:
        raise ClaimFailed(exc.errno, f"cannot write {run_file}: {exc.strerror or exc}") from exc


@dataclass
class Run:
    """One started runner, as its launcher knows it."""

    job_id: str
    job_file: Path
    launcher: str
    started: float | None = None  # wall clock, for the deadline of an adopted run


class Launcher(ABC):
    """What every launcher defines (one lacking an abstract method cannot be
    instantiated, and mypy says so where it is)."""

    name: str

    @abstractmethod
    def start(self, module: str, job_file: Path, data: dict[str, Any], on_exit: OnExit) -> Run:
        """Claim the job (its run.json, written before anything runs; ClaimFailed if it
        cannot be), then start its runner; a second call for the same job starts
        nothing. `on_exit` is called (from any thread) when the runner has ended."""

    @abstractmethod
    def adopt(self, job_file: Path, record: dict[str, Any], data: dict[str, Any],
              on_exit: OnExit) -> Run:
        """Watch a runner that an earlier supervisor started (`record` is its run.json)."""

    @abstractmethod
    def is_alive(self, run: Run) -> bool: ...

    # sync, release and close are optional: by default they do nothing.
    def sync(self, run: Run) -> None:  # noqa: B027
        """Bring the local job file up to date with the runner (local runners write it
        themselves)."""

    @abstractmethod
    def stop(self, run: Run, grace_s: float) -> None:
        """Stop the runner and everything it started; returns once it is gone."""

    @abstractmethod
    def exit_code(self, run: Run) -> int | None: ...

    @abstractmethod
    def describe_exit(self, run: Run) -> str:
        """How the runner ended, for a job that ended without a final state."""

    def release(self, run: Run) -> None:  # noqa: B027
        """Called once the local job file is final."""

    def close(self) -> None:  # noqa: B027
        """The supervisor leaves: stop watching (runners keep running)."""


@dataclass
class LocalRun(Run):
    runner: processes.Runner = field(default_factory=lambda: processes.Runner("", 0, None))


class LocalLauncher(Launcher):
    name = p.LOCAL

    def __init__(self, runner_env: dict[str, str] | None = None,
                 fork_server: bool | None = None) -> None:
        self.runner_env = runner_env or {}
        if fork_server is None:
            fork_server = forkserver.AVAILABLE and os.environ.get("OFFLOAD_FORK_SERVER") != "0"
        self._fork_server = fork_server
        self._forker: forkserver.ForkServer | None = None  # started with the first runner

    def start(self, module: str, job_file: Path, data: dict[str, Any], on_exit: OnExit) -> Run:
        run_file = p.sibling(job_file, p.RUN_FILE)
        record = p.read_json(run_file)
        if record is not None:
            return self.adopt(job_file, record, data, on_exit)  # claimed before: never twice
        if self._fork_server:
            if self._forker is None:
                self._forker = forkserver.ForkServer(processes.runner_env(self.runner_env))
            # Before the claim: between claim and spawn nothing slow may happen (the
            # folder can become unwritable meanwhile, and the job would fail, not wait).
            self._forker.ensure_started()
        # Claim first: a supervisor that dies right here leaves a job that is lost,
        # never one that runs twice.
        claim(run_file, {"pid": None, "claimed_by": os.getpid()})
        runner = processes.spawn(module, job_file, self.runner_env, self._forker)
        try:
            p.write_json(run_file, runner.record(), durable=True)
        except OSError as exc:  # only a later supervisor's adoption needs the record
            log.warning("job %s: cannot write its launch record: %s", runner.job_id, exc)
        if runner.child is not None:
            threading.Thread(target=_wait_exit, args=(runner, on_exit), daemon=True,
                             name=f"wait-{runner.job_id[:8]}").start()
        return LocalRun(runner.job_id, job_file, self.name, runner.create_time, runner)

    def adopt(self, job_file: Path, record: dict[str, Any], data: dict[str, Any],
              on_exit: OnExit) -> Run:
        job_id = p.id_of(job_file)
        pid = record.get("pid") or data.get(p.F_PID)
        create_time = record.get("create_time")
        runner = processes.Runner(job_id, int(pid) if isinstance(pid, int) else 0, create_time)
        if runner.pid and create_time is None:
            runner.create_time = _create_time_near(runner.pid, data.get(p.F_STARTED_AT))
        return LocalRun(job_id, job_file, self.name, runner.create_time, runner)

    def is_alive(self, run: Run) -> bool:
        runner = _runner(run)
        if not runner.pid or (runner.child is None and runner.create_time is None):
            return False  # nothing that we could tell apart from a reused pid
        return processes.is_alive(runner)

    def stop(self, run: Run, grace_s: float) -> None:
        processes.stop_tree(_runner(run), grace_s)

    def exit_code(self, run: Run) -> int | None:
        return processes.exit_code(_runner(run))

    def describe_exit(self, run: Run) -> str:
        return processes.describe_exit(self.exit_code(run))

    def release(self, run: Run) -> None:
        if _runner(run).pid:
            processes.kill_group(_runner(run))  # grandchildren that outlived the runner

    def close(self) -> None:
        if self._forker is not None:
            self._forker.close()


def _runner(run: Run) -> processes.Runner:
    assert isinstance(run, LocalRun), run
    return run.runner


def _wait_exit(runner: processes.Runner, on_exit: OnExit) -> None:
    assert runner.child is not None
    runner.child.wait()
    on_exit()


def _create_time_near(pid: int, started_at: object) -> float | None:
    """Without a launch record: accept the pid only if it started with the job."""
    if not isinstance(started_at, str):
        return None
    try:
        started = p.parse_iso(started_at)
    except ValueError:
        return None
    proc = find(pid, None)
    if proc is None:
        return None
    try:
        created = proc.create_time()
    except Exception:
        return None
    return created if abs(created - started) < _ADOPT_START_TOLERANCE_S else None
