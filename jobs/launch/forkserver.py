"""A warm interpreter that forks runners (Linux): `python -m jobs.launch.forkserver`.

A runner started with exec is a new interpreter, and the kernel's share of it (exec,
page faults) is shielded by no scheduling policy: a burst of such starts slows the API
far more than forks of an interpreter that has already imported the runners
(docs/benchmarks.md). So the supervisor keeps one of these. It has
imported the built-in runners; it forks each child ahead, while idle: the child makes
itself a process group of its own and waits for one job (a child that never gets one
exits with the server, unreported); given its job it answers, makes itself SCHED_IDLE
(only then: a SCHED_IDLE child on a busy machine would answer seconds late), sends its
output to the job's log, shows
`python -m runners.<kind> --job-file <file>` in `ps`, and runs the module as
`python -m` would. If a file of the project changed since this server started, the
child execs a fresh interpreter instead, so an edited runner always runs as edited.

Protocol, JSON lines: it says `{"ready": pid}` once it has imported the runners, and
`{"ahead": pid}` for each child forked ahead (the supervisor's claim may name it); the
supervisor writes `{"module", "job_file", "log"}` to its stdin; the answer is
`{"error": "..."}` from the server if it cannot fork, else `{"pid": n}` from the child
itself, before it runs anything of the job; later the server says `{"exit": pid,
"code": n}` when that child ends. So a server that dies or stalls right after a fork
loses no runner: until a child has answered it holds the reply pipe open, and the
supervisor starts a job another way only once that pipe has closed unanswered. The
server exits when its stdin closes (the supervisor is gone); its children run on, and a
later supervisor adopts them like any runner.

Once the supervisor has synced a runner's claim it writes `{"claim": pid, "job_file",
"durable": true}`, and the server passes the word on to the child it handed that job
on the pipe that brought the job: its runner waits for the word instead of syncing the
claim again (told false, or the pipe closed, it syncs the claim itself). No other
child holds that pipe: each closes the server's pipes to the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.launch.warm import (
    TITLE_ROOM,
    TITLE_ROOM_ENV,
    edited_since,
    preload,
    project_files,
    run_as_main,
    show_command_line,
)
from jobs.protocol import trust

log = logging.getLogger(__name__)

PRELOAD = ("runners.chat", "runners.sleep")  # train imports numpy: forked fresh instead
REPLY_TIMEOUT_S = 10.0
AHEAD_DELAY_S = 0.005  # idle this long after a request, the server forks the next runner
EXIT_POLL_S = 1.0  # how often a runner's waiter checks it without the server's word
AVAILABLE = sys.platform == "linux"
PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # a longer pipe write may be cut short
# Fault injection for the tests only; the product never sets it. `die_after_fork`: the
# server exits right after a fork, before it says anything; `stall_after_fork`: it goes
# on reading requests but never answers again. Real servers do this only by accident
# (the OOM killer, a stopped process), so a test cannot wait for one.
TEST_FAULT_ENV = "OFFLOAD_TEST_FORKSERVER_FAULT"


class ForkServerError(RuntimeError):
    """The fork server started no runner for this request; the caller starts it with
    exec."""


class ForkInDoubt(OSError):
    """The fork server went silent and could not be stopped: it may have forked the
    runner, so none is started again (the job fails instead of running twice)."""


# -- the server (its own process) ------------------------------------------------------


def main() -> int:
    trust.private_files()  # its children's job files and logs too
    preload(PRELOAD, "fork server")
    # The protocol leaves fds 0 and 1, so a stray print cannot corrupt it.
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    server = os.getpid()
    try:
        _send(replies, {"ready": server})
        request = _serve(requests, replies, project_files())
    except BrokenPipeError:
        if os.getpid() != server:
            raise  # a child's answer: as any runner's failure
        return 0  # the supervisor is gone (its runners run on): nobody to tell anything
    if request is None:
        return 0
    # Only a forked child gets here, with the server's frames gone from its stack.
    run_as_main(request["module"], request["job_file"])


def _serve(requests: int, replies: int, files: dict[str, int]) -> dict[str, Any] | None:
    """Fork a child per request until stdin closes (None); in a child, its request."""
    if sys.platform == "win32":
        raise OSError("no fork on Windows")  # never started there; tells the type checker
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal is for the API
    return _Server(requests, replies, files, (requests, replies, wake_r, wake_w)).serve()


class _Server:
    """The server's loop. The next child is forked ahead, while the server is idle, and
    waits for its request: the fork and the child's first steps are then off the path
    from a submission to its runner. It is forked AHEAD_DELAY_S after the last request,
    so that it does not take a core from the runner just given its job."""

    def __init__(self, requests: int, replies: int, files: dict[str, int],
                 fds: tuple[int, ...]) -> None:
        self.requests, self.replies, self.files, self.fds = requests, replies, files, fds
        self.ahead: _Ahead | None = None
        self.ahead_due: float | None = time.monotonic()
        self.waiting: set[int] = set()  # forked ahead, without a job: no exit to report
        self.handed: dict[int, _Ahead] = {}  # given a job, until told of its claim

    def serve(self) -> dict[str, Any] | None:
        wake_r = self.fds[2]
        pending = b""
        while True:
            due = self.ahead_due
            ready, _, _ = select.select([self.requests, wake_r], [], [],
                                        None if due is None else max(0.0, due - time.monotonic()))
            if wake_r in ready:
                os.read(wake_r, 4096)
                self._reap()
            if not ready:
                request = self._fork_ahead()
                if request is not None:
                    return request  # a child, given its job
                continue
            if self.requests not in ready:
                continue
            chunk = os.read(self.requests, 65536)
            if not chunk:
                return None
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = self._start(line)
                if request is not None:
                    return request  # a child forked for it

    def _start(self, line: bytes) -> dict[str, Any] | None:
        """Give the request to the child forked ahead, else fork one for it (None in the
        server; in that child, its request). A word on a claim goes to its runner."""
        request: dict[str, Any] = json.loads(line)
        if "claim" in request:
            handed = self.handed.get(int(request["claim"]))
            if handed is not None and handed.job_file == request.get("job_file"):
                del self.handed[handed.pid]
                handed.tell(bool(request.get("durable")))
            return None
        stale = edited_since(self.files)
        ahead, self.ahead = self.ahead, None
        if ahead is not None and not stale and ahead.hand(line, request.get("job_file")):
            self.waiting.discard(ahead.pid)
            self.handed[ahead.pid] = ahead
        else:
            if ahead is not None:  # its code is stale, or it is gone: it exits
                ahead.close()
            try:
                pid = _fork(request, stale, self.replies, self._fds())
            except OSError as exc:
                _send(self.replies, {"error": str(exc)})
                return None
            if pid == 0:
                return request
        # A stale server forks none ahead: every runner is a fresh interpreter.
        self.ahead_due = None if stale else time.monotonic() + AHEAD_DELAY_S
        _test_fault(self.requests)  # the child has answered, or will
        return None

    def _fork_ahead(self) -> dict[str, Any] | None:
        self.ahead_due = None
        if edited_since(self.files):
            return None
        try:
            forked = _fork_a_child(self.replies, self._fds())
        except OSError as exc:  # EMFILE, EAGAIN, ENOMEM: nothing asked for it, so no answer
            # The next request gets a child forked for it, and the one after is ahead again.
            print(f"fork server: cannot fork a child ahead: {exc}", file=sys.stderr, flush=True)
            return None
        if isinstance(forked, dict):
            return forked
        self.ahead = forked
        self.waiting.add(forked.pid)
        _send(self.replies, {"ahead": forked.pid})  # the supervisor may claim in its name
        return None

    def _fds(self) -> tuple[int, ...]:
        """What a new child must close: the server's own pipes, and those to the children
        handed a job (only the server may tell one of them that its claim is on disk)."""
        return self.fds + tuple(handed.fd for handed in self.handed.values())

    def _reap(self) -> None:
        """Report the exit of every child that ended, but of those forked ahead that
        never had a job."""
        if sys.platform == "win32":
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            handed = self.handed.pop(pid, None)
            if handed is not None:
                handed.close()
            if pid in self.waiting:
                self.waiting.discard(pid)
            else:
                _send(self.replies, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if self.ahead is not None and self.ahead.pid not in self.waiting:  # died waiting
            self.ahead.close()
            self.ahead, self.ahead_due = None, time.monotonic() + AHEAD_DELAY_S


class _Ahead:
    """A child forked ahead, as the server holds it: its pid, and its end of the pipe
    that brings its request, then the word that its claim is on disk."""

    def __init__(self, pid: int, to_child: int) -> None:
        self.pid = pid
        self.fd = to_child
        self.job_file: object = None  # the job it was handed

    def hand(self, line: bytes, job_file: object) -> bool:
        """Give it its request line; False if it is gone, or the line is too long to be
        written whole (it gets no other)."""
        self.job_file = job_file
        data = line + b"\n"
        if len(data) > PIPE_BUF:
            # A longer write may be cut short (a SIGCHLD while the pipe is full) and then
            # the child waits for the rest in vain: a child is forked for the request.
            self.close()
            return False
        try:
            os.write(self.fd, data)  # at most PIPE_BUF: all of it or nothing
            return True
        except OSError:
            self.close()
            return False

    def tell(self, durable: bool) -> None:
        """Tell its runner whether its claim is on disk (if not, it syncs it itself)."""
        if durable:
            with contextlib.suppress(OSError):  # it has ended: nobody to tell
                os.write(self.fd, p.DURABLE_WORD)
        self.close()

    def close(self) -> None:
        """Without a request, it exits; with one, its runner syncs its claim itself."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fork_a_child(replies: int, server_fds: tuple[int, ...]) -> _Ahead | dict[str, Any]:
    """In the server, the child forked; in the child, once it has become the runner of
    the request it waited for, that request."""
    if sys.platform == "win32":
        raise OSError("no fork on Windows")
    from_server, to_child = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(from_server)
        os.close(to_child)
        raise
    if pid != 0:
        os.close(from_server)
        return _Ahead(pid, to_child)
    unanswered = False  # handed a request that nobody has answered yet
    try:
        os.close(to_child)
        _leave_server(replies, server_fds)
        line, said = _read_request(from_server)
        if not line:
            os._exit(0)  # dropped, or the server is gone: no job, nothing to say
        unanswered = True
        request: dict[str, Any] = json.loads(line)
        log_fd = p.open_log(request["log"])
        unanswered = False  # the pid is the first thing it sends
        # Its runner hears on this pipe that the supervisor has put its claim on disk.
        if said == p.DURABLE_WORD:
            os.close(from_server)
            os.environ[p.CLAIM_WORD_ENV] = p.DURABLE
        else:
            os.environ[p.CLAIM_WORD_ENV] = str(from_server)
        _become_runner(request, log_fd, replies, False)
    except BaseException as exc:  # never back into the server's loop
        os.write(2, f"fork server: cannot start the runner: {exc!r}\n".encode())
        if unanswered:
            # As the server answered when it opened the log itself: no runner, said at
            # once (silence would hold the supervisor REPLY_TIMEOUT_S, then kill the server).
            with contextlib.suppress(OSError):
                _send(replies, {"error": str(exc)})
        os._exit(70)
    return request


def _read_request(fd: int) -> tuple[bytes, bytes]:
    """The request line from the server (empty if none came), and what followed it: the
    claim's word may already be there. Unbuffered: the word must stay for the runner."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, PIPE_BUF)
        if not chunk:
            return b"", b""
        data += chunk
    line, said = data.split(b"\n", 1)
    while said and len(said) < len(p.DURABLE_WORD):  # the rest of the word is in the pipe
        chunk = os.read(fd, len(p.DURABLE_WORD) - len(said))
        if not chunk:
            break
        said += chunk
    return line, said


def _test_fault(requests: int) -> None:
    fault = os.environ.get(TEST_FAULT_ENV)
    if fault in ("die_after_fork", "stall_after_fork"):
        print(f"fork server: test fault {fault}", file=sys.stderr, flush=True)
    if fault == "die_after_fork":
        os._exit(1)
    if fault == "stall_after_fork":
        while os.read(requests, 65536):
            pass  # never answers; leaves when the supervisor does
        os._exit(0)


def _fork(request: dict[str, Any], stale: bool, replies: int,
          server_fds: tuple[int, ...]) -> int:
    if sys.platform == "win32":
        raise OSError("no fork on Windows")
    log_fd = p.open_log(request["log"])
    try:
        pid: int = os.fork()
    except OSError:
        os.close(log_fd)
        raise
    if pid != 0:
        os.close(log_fd)
        return pid
    try:
        _leave_server(replies, server_fds)
        _become_runner(request, log_fd, replies, stale)
    except BaseException as exc:  # never back into the server's loop
        os.write(2, f"fork server: cannot start the runner: {exc!r}\n".encode())
        os._exit(70)
    return 0


def _leave_server(replies: int, server_fds: tuple[int, ...]) -> None:
    """A forked child's first steps, before it has a job: a process group of its own
    (killpg stops its tree; Ctrl+C in a terminal is not for it), the signals as a new
    interpreter has them, and none of the server's pipes but the reply pipe. Not yet the
    lowest priority: see `_become_runner`."""
    if sys.platform == "win32":
        raise OSError("no fork on Windows")
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in server_fds:
        if fd != replies:
            os.close(fd)


def _become_runner(request: dict[str, Any], log_fd: int, replies: int, stale: bool) -> None:
    # The answer comes from here, not from the server: a server that dies or stalls now
    # cannot leave a runner that the supervisor does not know.
    _send(replies, {"pid": os.getpid()})
    # Only now the lowest priority: a SCHED_IDLE child gets next to no CPU while the
    # machine is busy, and the supervisor waits for this answer (one spawn at a time,
    # the server stopped after REPLY_TIMEOUT_S). An unprivileged process cannot go back,
    # so a child forked ahead waits at the server's priority (blocked: it costs nothing).
    if sys.platform == "linux":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass  # the launcher lowers its nice value as well
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in (devnull, log_fd, replies):
        os.close(fd)
    argv = [sys.executable, "-m", request["module"], "--job-file", request["job_file"]]
    if stale:  # a project file changed since the server started: run the code as it is now
        os.environ.pop(TITLE_ROOM_ENV, None)
        os.execv(sys.executable, argv)
    show_command_line(argv)
    os.environ.pop(TITLE_ROOM_ENV, None)  # its room is taken now; the runner never sees it


def _send(replies: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(replies, data):]


# -- the client (in the supervisor) ----------------------------------------------------


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
        log.warning("runner %s: its fork server ended or stalled first; its exit code is "
                    "lost", pid)
        while _running(pid, create_time):
            time.sleep(0.1)
        return None

    def close(self) -> None:
        """Stop the server (its runners run on)."""
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
    from jobs.launch.pids import find  # the supervisor's side only (psutil)

    return find(pid, create_time) is not None


def _create_time(pid: int) -> float | None:
    import psutil  # the supervisor's side only

    from jobs.launch.pids import created

    try:
        return created(pid)
    except psutil.Error:
        return None  # gone already (its server died, and init reaped it)


if __name__ == "__main__":
    sys.exit(main())
