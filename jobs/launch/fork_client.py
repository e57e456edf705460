"""The fork server as the supervisor holds it: started on first use and again after it
died, asked for runners, told of their claims, and heard out on their exits (the
protocol is in `jobs.launch.forkserver`, whose process imports none of this).
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from jobs import protocol as p
from jobs.launch.pids import created, find
from jobs.launch.warm import TITLE_ROOM, TITLE_ROOM_ENV

log = logging.getLogger(__name__)

AVAILABLE = sys.platform == "linux"
REPLY_TIMEOUT_S = 10.0
EXIT_POLL_S = 1.0  # how often a runner's waiter checks it without the server's word


class ForkServerError(RuntimeError):
    """The fork server started no runner for this request; the caller starts it with
    exec."""


class ForkInDoubt(OSError):
    """The fork server went silent and could not be stopped: it may have forked the
    runner, so none is started again (the job fails instead of running twice)."""


class Forked:
    """A runner the fork server started; `wait()` returns its exit code, or -1 with
    `lost` set if the server died or stalled before it could say."""

    def __init__(self, pid: int, server: ForkServer, generation: int,
                 create_time: float | None = None, job_file: str = "") -> None:
        self.pid = pid
        self.generation = generation
        self.job_file = job_file
        self.returncode: int | None = None
        self.lost = False
        self.create_time = create_time or _create_time(pid)
        self._server = server

    def wait(self) -> int:
        if self.returncode is None:
            code = self._server.wait_exit(self.pid, self.create_time, self.generation)
            self.lost = code is None
            self.returncode = -1 if code is None else code
        return self.returncode


class ForkServer:
    """One `python -m jobs.launch.forkserver` for a supervisor; started on first use and again
    after it died. Thread-safe."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request at a time
        self._writing = threading.Lock()  # one line at a time into its stdin
        self._changed = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}  # generation -> its unread answer
        self._exits: dict[int, int] = {}
        # Runners that answered with their pid, until their exit is read: the exit of any
        # other child (one that answered an error) is not kept, or a later runner given
        # its pid again would read that code as its own.
        self._runners: set[int] = set()
        self._generation = 0  # which server a child belongs to
        self._alive: set[int] = set()  # generations still running
        self._closed = False  # its supervisor leaves: a runner's exit code is the next one's
        # The child forked ahead, as the server announced it: (generation, pid, create time).
        self._ahead: tuple[int, int, float] | None = None

    def spawn(self, module: str, job_file: Path, log_path: str) -> Forked:
        request = {"module": module, "job_file": str(job_file), "log": log_path}
        with self._lock:
            try:
                proc = self._ensure_started()
            except OSError as exc:
                raise ForkServerError(f"cannot start the fork server: {exc}") from exc
            generation = self._generation
            with self._changed:
                ahead, self._ahead = self._ahead, None  # taken by this request, or gone
            try:
                self._write(proc, request)
            except (OSError, ValueError) as exc:  # ValueError: closed meanwhile
                # No whole request line reached it, so it forked nothing.
                raise ForkServerError(f"the fork server is gone: {exc}") from exc
            reply = self._answer(proc, generation)
        if "pid" not in reply:
            raise ForkServerError(str(reply.get("error", reply)))
        pid = int(reply["pid"])
        known = ahead[2] if ahead is not None and ahead[:2] == (generation, pid) else None
        return Forked(pid, self, generation, known, str(job_file))

    def ahead(self) -> tuple[int, float] | None:
        """The pid and create time of the child the next request will most likely go to
        (the one forked ahead), so that its claim can name it before it is asked for."""
        with self._changed:
            if self._ahead is None or self._ahead[0] != self._generation \
                    or self._ahead[0] not in self._alive:
                return None
            return self._ahead[1], self._ahead[2]

    def tell_claim(self, runner: Forked, durable: bool) -> None:
        """Tell `runner` whether the supervisor has put its claim on disk (if not, or
        never told, it syncs it itself). Never waits for a spawn's answer."""
        proc = self._proc
        if proc is None or runner.generation != self._generation:
            return  # its server is gone, and the pipe to it closed with it
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            self._write(proc, {"claim": runner.pid, "job_file": runner.job_file,
                               "durable": durable})

    def _write(self, proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        with self._writing:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()

    def ensure_started(self) -> None:
        """Start the server now if it is not running (a spawn would do it too)."""
        with self._lock:
            try:
                self._ensure_started()
            except OSError as exc:
                log.warning("cannot start the fork server: %s", exc)

    def wait_exit(self, pid: int, create_time: float | None, generation: int) -> int | None:
        """The runner's exit code as the server reports it; None (once the runner is
        gone) if the server ended or stalled first."""
        def told() -> bool:
            return pid in self._exits or generation not in self._alive

        while True:
            with self._changed:
                if self._changed.wait_for(told, EXIT_POLL_S):
                    break
            if not _running(pid, create_time):  # a stalled server never reaps it
                with self._changed:
                    self._changed.wait_for(told, REPLY_TIMEOUT_S)
                break
        with self._changed:
            self._runners.discard(pid)  # an exit reported from now on is nobody's
            if pid in self._exits:
                return self._exits.pop(pid)
        if not self._closed:  # at a stop, every runner's: the next supervisor adopts them
            log.warning("runner %s: its fork server ended or stalled first; its exit code "
                        "is lost", pid)
        while _running(pid, create_time):
            time.sleep(0.1)
        return None

    def close(self) -> None:
        """Stop the server (its runners run on)."""
        self._closed = True
        with self._lock:
            if self._proc is not None:
                _close_stdin(self._proc)

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc
            _close_stdin(self._proc)
        # The room is in the environment, not an argument: a title longer than the
        # arguments is what makes the kernel show it alone, without NULs after it.
        proc = self._proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.launch.forkserver"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env={**self.env, TITLE_ROOM_ENV: " " * TITLE_ROOM},
            cwd=p.ROOT, close_fds=True)
        with self._changed:
            self._generation += 1
            generation = self._generation
            self._alive.add(generation)
        threading.Thread(target=self._read, args=(proc, generation), daemon=True,
                         name="fork-server").start()
        if self._next_reply(generation) is None:  # ready once it has imported
            proc.kill()
            raise OSError("the fork server did not start")
        return proc

    def _answer(self, proc: subprocess.Popen[bytes], generation: int) -> dict[str, Any]:
        """The answer to a request. A child answers before it runs anything of the job
        and holds the reply pipe until then, so only a pipe closed at every end without
        an answer means that no runner of this request exists."""
        reply = self._next_reply(generation)
        if reply is None:  # silent or gone: stop it, then hear out a child it forked
            proc.kill()
            reply = self._next_reply(generation)
        if reply is not None:
            return reply
        if not self._ended(generation):
            _close_stdin(proc)
            self._proc = None  # a new server for the next job
            raise ForkInDoubt("the fork server stopped answering and could not be stopped; "
                              "it may have started this job's runner")
        raise ForkServerError("the fork server ended without starting the runner")

    def _next_reply(self, generation: int) -> dict[str, Any] | None:
        """The server's (or its child's) next answer; None if the reply pipe closed
        first or nothing came for REPLY_TIMEOUT_S."""
        with self._changed:
            self._changed.wait_for(
                lambda: generation in self._replies or generation not in self._alive,
                REPLY_TIMEOUT_S)
            return self._replies.pop(generation, None)

    def _ended(self, generation: int) -> bool:
        """Its reply pipe is closed at every end: neither it nor a child can answer."""
        with self._changed:
            return generation not in self._alive

    def _read(self, proc: subprocess.Popen[bytes], generation: int) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue  # a stray print of a preloaded module, before the protocol began
                if "ahead" in message:
                    pid = int(message["ahead"])
                    create_time = _create_time(pid)  # here, off the path of a launch
                    with self._changed:
                        if create_time is not None:
                            self._ahead = (generation, pid, create_time)
                    continue
                with self._changed:
                    if "exit" in message:
                        if int(message["exit"]) in self._runners:
                            self._exits[int(message["exit"])] = int(message["code"])
                    else:
                        if "pid" in message:  # in the pipe's order: before its exit
                            self._runners.add(int(message["pid"]))
                            if self._ahead is not None and self._ahead[1] == message["pid"]:
                                self._ahead = None  # announced before it was handed the job
                        self._replies[generation] = message
                    self._changed.notify_all()
        proc.wait()
        with self._changed:
            self._alive.discard(generation)
            self._changed.notify_all()


def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass  # the server is gone: nothing to tell it


def _running(pid: int, create_time: float | None) -> bool:
    return find(pid, create_time) is not None


def _create_time(pid: int) -> float | None:
    try:
        return created(pid)
    except psutil.Error:
        return None  # gone already (its server died, and init reaped it)
