"""The local launcher: runners as processes of this machine, forked by the fork server
where there is one (Linux), else taken from warm spare interpreters (`jobs.launch.spare`),
or started as new interpreters (`jobs.launch.processes`): `OFFLOAD_LAUNCH_MODE`."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sys
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from jobs import protocol as p
from jobs.launch import fork_client, forkserver, pids, processes, spare_pool
from jobs.launch.base import CannotStartNow, Launcher, OnExit, Run, claim
from jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)

ADOPT_START_TOLERANCE_S = 5.0
# A spare that has taken a job shows it in its command line on Linux only; elsewhere one
# is known by having been there before its job started (not on Linux: a step of the clock
# back could make a spare started since look older).
SPARES_SHOW_NO_JOB = sys.platform != "linux"
# What a fork, a spawn or a new thread fails with while the machine has no room for one
# now (a limit on processes or open files, memory): the job waits rather than fails.
NO_ROOM_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
FORK, SPARES, SPAWN = "fork", "spares", "spawn"  # how a runner starts


def launch_mode(settings: Settings) -> str:
    """`OFFLOAD_LAUNCH_MODE`, or by default the fork server (`OFFLOAD_FORK_SERVER=0`: a
    new interpreter per runner); where no fork server can run, spares do its work."""
    mode: str = settings.launch_mode
    if mode == "auto":
        mode = FORK if settings.fork_server else SPAWN
    return _runnable(mode)


def _runnable(mode: str) -> str:
    return SPARES if mode == FORK and not fork_client.AVAILABLE else mode


@dataclass
class LocalRun(Run):
    runner: processes.Runner = field(default_factory=lambda: processes.Runner("", 0, None))


class LocalLauncher(Launcher):
    name = p.LOCAL

    def __init__(self, runner_env: dict[str, str] | None = None,
                 mode: str | None = None) -> None:
        """`mode`: FORK, SPARES or SPAWN; by default the settings' (`launch_mode`)."""
        self.runner_env = runner_env or {}
        self.mode = launch_mode(get_settings()) if mode is None else _runnable(mode)
        # Started with the first runner:
        self._forker: fork_client.ForkServer | None = None
        self._spares: spare_pool.SparePool | None = None
        # One thread: claims put on disk while their runners start (see `start`).
        self._claims = ThreadPoolExecutor(1, thread_name_prefix="claim-sync")

    def start(self, module: str, job_file: Path, data: dict[str, Any], on_exit: OnExit) -> Run:
        run_file = p.sibling(job_file, p.RUN_FILE)
        record = p.read_json(run_file)
        if record is not None:
            return self.adopt(job_file, record, data, on_exit)  # claimed before: never twice
        if self.mode == SPARES and self._spares is None:
            # What the fork server imports ahead: the project's runners, safe to import.
            self._spares = spare_pool.SparePool(processes.runner_env(self.runner_env),
                                                forkserver.PRELOAD)
        if self.mode == FORK:
            if self._forker is None:
                self._forker = fork_client.ForkServer(processes.runner_env(self.runner_env))
            # Before the claim: between claim and spawn nothing slow may happen (the
            # folder can become unwritable meanwhile, and the job would fail, not wait).
            self._forker.ensure_started()
        # The claim names the child the fork server forked ahead, the one it will most
        # likely give this job: then it goes on disk at once, while that child starts,
        # and is not written again once the child has answered. (Launches are the
        # supervisor loop's alone: no other takes that child meanwhile.)
        ahead = self._forker.ahead() if self._forker is not None else None
        # Claim first: a supervisor that dies right here leaves a job that is lost,
        # never one that runs twice. Not fsync'd before the spawn: that is done while
        # the runner starts, and the runner waits for it before it runs anything of
        # the job (`p.sync_claim`).
        record = {"pid": None, "claimed_by": os.getpid(), "launched_ns": time.time_ns()} \
            if ahead is None else processes.Runner(p.id_of(job_file), *ahead).record()
        try:
            claim(job_file, record, durable=False, exclusive=True)
        except FileExistsError:  # a runner started by hand claimed it a moment before
            return self.adopt(job_file, p.read_json_or_none(run_file) or {}, data, on_exit)
        started: Future[processes.Runner] = Future()
        try:
            # Its waiter first: a runner that no thread could watch would look alive for good.
            threading.Thread(target=_wait_exit, args=(started, on_exit), daemon=True,
                             name=f"wait-{p.id_of(job_file)[:8]}").start()
            synced = None if ahead is None else self._claims.submit(p.sync_claim, job_file)
            taken = self._spares.take(module, job_file) if self._spares is not None else None
            # Raises only while no runner of the job exists: it starts one or none.
            runner = processes.spawn(module, job_file, self.runner_env, self._forker, taken)
        except BaseException as exc:
            started.cancel()
            if isinstance(exc, fork_client.ForkInDoubt) or not _no_room(exc):
                raise
            _take_back(run_file)
            raise CannotStartNow(exc.errno if isinstance(exc, OSError) else errno.EAGAIN,
                                 f"no room to start a runner now: {exc}") from exc
        started.set_result(runner)
        if synced is None or (runner.pid, runner.create_time) != ahead:
            try:
                # Not fsync'd for its own sake: a power cut that loses it ends the runner
                # too, and the durable claim alone then says lost.
                p.write_json(run_file, p.launch_record(job_file, runner.record()))
            except OSError as exc:  # only a later supervisor's adoption needs the record
                log.warning("job %s: cannot write its launch record: %s", runner.job_id, exc)
            # After the pid's write, which replaces the file: started before, it was done
            # twice. A runner that gets there first syncs the bare claim itself.
            synced = self._claims.submit(p.sync_claim, job_file)
        if isinstance(runner.child, fork_client.Forked) and self._forker is not None:
            # Its runner waits for the word instead of flushing the disk again itself.
            synced.add_done_callback(functools.partial(_tell_claim, self._forker, runner.child))
        # Now, not its create time: a spare was started long before it was given the job.
        return LocalRun(runner.job_id, job_file, self.name, time.time(), runner)

    def adopt(self, job_file: Path, record: dict[str, Any], data: dict[str, Any],
              on_exit: OnExit) -> Run:
        job_id = p.id_of(job_file)
        pid, create_time = record.get("pid"), record.get("create_time")
        pid = pid if isinstance(pid, int) and pid > 0 else 0
        if isinstance(create_time, (int, float)):
            create_time = pids.recorded(create_time, record)
            if create_time is None:  # launched before a reboot: it ended with that boot
                gone = processes.Runner(job_id, 0, None)
                return LocalRun(job_id, job_file, self.name, None, gone)
        runner = processes.Runner(job_id, pid, create_time)
        if runner.create_time is None or not processes.is_alive(runner):
            # A bare claim; or one naming the child forked ahead while another child took
            # the job, whose record was never written: the pid the runner wrote itself (or
            # a record's without its create time), if it started with the job; else the
            # process that shows it runs this job (it may not have written its pid yet).
            for candidate in (data.get(p.F_PID), pid if create_time is None else None):
                if isinstance(candidate, int) and candidate > 0:
                    found = _create_time_of_its_runner(candidate, data.get(p.F_STARTED_AT),
                                                       job_file)
                    if found is not None:
                        runner = processes.Runner(job_id, candidate, found)
                        break
            else:
                runner = _runner_showing(job_file) or runner
        runner.own_group = not record.get("by_hand")
        # When the job was given to it: a spare was started long before.
        launched_ns = record.get("launched_ns")
        started = launched_ns / 1e9 if isinstance(launched_ns, int) else runner.create_time
        return LocalRun(job_id, job_file, self.name, started, runner)

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
        self._claims.shutdown(wait=False)
        if self._forker is not None:
            self._forker.close()
        if self._spares is not None:
            self._spares.close()


def _runner(run: Run) -> processes.Runner:
    assert isinstance(run, LocalRun), run
    return run.runner


def _tell_claim(forker: fork_client.ForkServer, runner: fork_client.Forked,
                synced: Future[None]) -> None:
    forker.tell_claim(runner, not synced.cancelled() and synced.exception() is None)


def _wait_exit(started: Future[processes.Runner], on_exit: OnExit) -> None:
    """Reap the runner once started (nothing to do if none was, or none of ours)."""
    if started.cancelled():
        return
    with contextlib.suppress(CancelledError):
        child = started.result().child
        if child is not None:
            child.wait()
            on_exit()


def _no_room(exc: BaseException) -> bool:
    """Whether `exc` says the machine has no room for a process or thread now: Python
    says "can't start new thread" without an errno."""
    if isinstance(exc, OSError):
        return exc.errno in NO_ROOM_ERRNOS
    return isinstance(exc, RuntimeError) and "new thread" in str(exc)


def _take_back(run_file: str) -> None:
    """Remove a claim under which nothing started: the job stays queued."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run_file)
    with contextlib.suppress(OSError):
        p.sync_dir(os.path.dirname(run_file))


def _runner_showing(job_file: Path) -> processes.Runner | None:
    """The live process of ours whose command line runs this job (`--job-file <file>`,
    as every runner shows on Linux, and a new interpreter's everywhere); of several (a
    wrapper around it), the latest started."""
    ours, found = psutil.Process().username(), []
    for proc in psutil.process_iter(["cmdline", "username"]):
        if proc.info["username"] == ours and _runs(proc.info["cmdline"], job_file):
            try:
                found.append(processes.Runner(p.id_of(job_file), proc.pid,
                                              pids.created(proc.pid)))
            except psutil.Error:
                pass  # it has just ended
    return max(found, key=lambda runner: runner.create_time or 0.0, default=None)


def _runs(argv: list[str] | None, job_file: Path) -> bool:
    """Whether a command line runs this job. A forked runner's shows as one string, which
    psutil splits at its spaces, a path's included: compared as one string too."""
    return " ".join(argv or ()).endswith(f"--job-file {job_file}")


def _create_time_of_its_runner(pid: int, started_at: object, job_file: Path
                               ) -> float | None:
    """Without a launch record: accept the pid only if it started with the job, or if
    its command line says it runs this job (a step of the clock moves a create time and
    not a written start), or is a warm spare's that was there before the job started (a
    spare takes its job long after its start, and shows the job in its command line on
    Linux only)."""
    if not isinstance(started_at, str):
        return None
    try:
        started = p.parse_iso(started_at)
    except ValueError:
        return None
    proc = pids.find(pid, None)
    if proc is None:
        return None
    try:
        if proc.username() != psutil.Process().username():
            return None  # another account's, whatever it shows: never a runner of ours
        # On the clock, as the job's start was written (a step of the clock since moves
        # one and not the other: then its command line says whether it runs the job).
        on_the_clock = proc.create_time()
        argv = proc.cmdline()
        if abs(on_the_clock - started) < ADOPT_START_TOLERANCE_S or _runs(argv, job_file) or (
                SPARES_SHOW_NO_JOB and on_the_clock < started
                and spare_pool.SPARE_MODULE in argv):
            return pids.created(pid)
        return None
    except Exception:
        return None
