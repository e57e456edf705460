"""A warm interpreter that forks runners (Linux): `python -m jobs.forkserver`.

A runner started with exec is a new interpreter: ~10 ms bare, ~40 ms with the chat
runner's imports, and the kernel's share of it (exec, page faults) is shielded by no
scheduling policy. Measured here, fifty such starts at SCHED_IDLE took the API's
`/api/history` p99 to 2.4-2.5x its idle p99; fifty forks of an interpreter that had
already imported the runners, 1.03-1.07x. So the supervisor keeps one of these. It has
imported the built-in runners; per job it forks a child that makes itself SCHED_IDLE
and a process group of its own, sends its output to the job's log, shows
`python -m runners.<kind> --job-file <file>` in `ps`, and runs the module as
`python -m` would. If a file of the project changed since this server started, the
child execs a fresh interpreter instead, so an edited runner always runs as edited.

Protocol, JSON lines: it says `{"ready": pid}` once it has imported the runners; the
supervisor writes `{"module", "job_file", "log"}` to its stdin; it answers `{"pid": n}`
or `{"error": "..."}`, and later `{"exit": pid, "code": n}` when that child ends. It
exits when its stdin closes (the supervisor is gone); its children run on, and a later
supervisor adopts them like any runner.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from jobs import protocol as p

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ("runners.chat", "runners.sleep")  # train imports numpy: forked fresh instead
TITLE_ROOM = 1024  # bytes of command line a child can show (its job file's path)
REPLY_TIMEOUT_S = 10.0
AVAILABLE = sys.platform == "linux"


class ForkServerError(RuntimeError):
    """The fork server could not start a runner; the caller starts it with exec."""


# -- the server (its own process) ------------------------------------------------------


def main() -> int:
    p.private_files()  # its children's job files and logs too
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken runner: its jobs will say so when they run
            print(f"fork server: cannot preload {name}: {exc}", file=sys.stderr)
    # The protocol leaves fds 0 and 1, so a stray print cannot corrupt it.
    requests, replies = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    _send(replies, {"ready": os.getpid()})
    request = _serve(requests, replies, _project_files())
    if request is None:
        return 0
    # Only a forked child gets here, with the server's frames gone from its stack.
    return _run_runner(request)


def _run_runner(request: dict[str, Any]) -> int:
    """Run the runner module as `python -m` would, then end the process the way
    multiprocessing ends a forked child: wait for its threads, flush, `os._exit` —
    tearing down the few hundred modules the server had loaded took 10 ms."""
    sys.argv = [request["module"], "--job-file", request["job_file"]]
    # A fresh __main__, not the preloaded module (whose imports stay loaded: they are
    # what the preloading saves).
    sys.modules.pop(request["module"], None)
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at exit
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _serve(requests: int, replies: int, files: dict[str, int]) -> dict[str, Any] | None:
    """Fork a child per request until stdin closes (None); in a child, its request."""
    if sys.platform == "win32":
        raise OSError("no fork on Windows")  # never started there; tells the type checker
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in a terminal is for the API
    pending = b""
    while True:
        ready, _, _ = select.select([requests, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(replies)
        if requests not in ready:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:
            return None
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request: dict[str, Any] = json.loads(line)
            try:
                pid = _fork(request, files, (requests, replies, wake_r, wake_w))
            except OSError as exc:
                _send(replies, {"error": str(exc)})
                continue
            if pid == 0:
                return request
            _send(replies, {"pid": pid})


def _fork(request: dict[str, Any], files: dict[str, int], server_fds: tuple[int, ...]) -> int:
    if sys.platform == "win32":
        raise OSError("no fork on Windows")
    stale = _project_files() != files
    log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        pid: int = os.fork()
    except OSError:
        os.close(log_fd)
        raise
    if pid != 0:
        os.close(log_fd)
        return pid
    try:
        _become_runner(request, log_fd, server_fds, stale)
    except BaseException as exc:  # never back into the server's loop
        os.write(2, f"fork server: cannot start the runner: {exc!r}\n".encode())
        os._exit(70)
    return 0


def _become_runner(request: dict[str, Any], log_fd: int, server_fds: tuple[int, ...],
                   stale: bool) -> None:
    if sys.platform == "win32":
        raise OSError("no fork on Windows")  # never started there; tells the type checker
    os.setpgid(0, 0)  # its own process group, as a spawned runner: killpg stops its tree
    if sys.platform == "linux":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass  # the launcher lowers its nice value as well
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in (devnull, log_fd, *server_fds):
        os.close(fd)
    argv = [sys.executable, "-m", request["module"], "--job-file", request["job_file"]]
    if stale:  # a project file changed since the server started: run the code as it is now
        os.execv(sys.executable, argv)
    _show_command_line(argv)


def _reap(replies: int) -> None:
    if sys.platform == "win32":
        return
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(replies, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _send(replies: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(replies, data):]


def _project_files() -> dict[str, int]:
    """The project's modules this interpreter has loaded, with their mtimes."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(str(ROOT)) and ".venv" not in path:
            try:
                files[path] = os.stat(path).st_mtime_ns
            except OSError:
                files[path] = 0
    return files


def _show_command_line(argv: list[str]) -> None:
    """Write `argv` over this process's command line (what `ps` and psutil show), the way
    setproctitle does on Linux: one string, its spaces separating the arguments."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[48 - 3]), int(fields[49 - 3])  # arg_start, arg_end (man 5 proc)
        title = " ".join(argv).encode()[: end - start - 2]
        # NUL after the title, and the last byte not NUL: the kernel then shows the
        # title alone (it assumes setproctitle), not the old arguments after it.
        room = title + b"\0" + b" " * (end - start - len(title) - 1)
        ctypes.memmove(start, room, len(room))
    except (OSError, ValueError, IndexError):
        pass  # it runs all the same; ps shows the fork server's command line


# -- the client (in the supervisor) ----------------------------------------------------


class Forked:
    """A runner the fork server started; `wait()` returns its exit code (-1 if the fork
    server ended before it and the code was lost)."""

    def __init__(self, pid: int, server: ForkServer, generation: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._server = server
        self._generation = generation

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self._server.wait_exit(self.pid, self._generation)
        return self.returncode


class ForkServer:
    """One `python -m jobs.forkserver` for a supervisor; started on first use and again
    after it died. Thread-safe."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request at a time
        self._changed = threading.Condition()
        self._reply: dict[str, Any] | None = None
        self._exits: dict[int, int] = {}
        self._generation = 0  # which server a child belongs to
        self._alive: set[int] = set()  # generations still running

    def spawn(self, module: str, job_file: Path, log_path: str) -> Forked:
        request = {"module": module, "job_file": str(job_file), "log": log_path}
        with self._lock:
            try:
                proc = self._ensure_started()
            except OSError as exc:
                raise ForkServerError(f"cannot start the fork server: {exc}") from exc
            generation = self._generation
            assert proc.stdin is not None
            try:
                proc.stdin.write((json.dumps(request) + "\n").encode())
                proc.stdin.flush()
            except (OSError, ValueError) as exc:  # ValueError: closed meanwhile
                raise ForkServerError(f"the fork server is gone: {exc}") from exc
            reply = self._next_reply(proc, generation)
        if reply is None:
            raise ForkServerError("the fork server did not answer")
        if "pid" not in reply:
            raise ForkServerError(str(reply.get("error", reply)))
        return Forked(int(reply["pid"]), self, generation)

    def ensure_started(self) -> None:
        """Start the server now if it is not running (a spawn would do it too)."""
        with self._lock:
            try:
                self._ensure_started()
            except OSError as exc:
                log.warning("cannot start the fork server: %s", exc)

    def wait_exit(self, pid: int, generation: int) -> int:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or generation not in self._alive)
            if pid in self._exits:
                return self._exits.pop(pid)
        log.warning("runner %s: its fork server ended first; its exit code is lost", pid)
        while _running(pid):
            time.sleep(0.1)
        return -1

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
        # Room for a child's command line: the kernel keeps the arguments' space.
        proc = self._proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.forkserver", " " * TITLE_ROOM],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, cwd=str(ROOT),
            close_fds=True)
        with self._changed:
            self._generation += 1
            generation = self._generation
            self._alive.add(generation)
        threading.Thread(target=self._read, args=(proc, generation), daemon=True,
                         name="fork-server").start()
        if self._next_reply(proc, generation) is None:  # ready once it has imported
            raise OSError("the fork server did not start")
        return proc

    def _next_reply(self, proc: subprocess.Popen[bytes], generation: int
                    ) -> dict[str, Any] | None:
        """The server's next answer; None if it ended first or stayed silent (then it
        is killed)."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._reply is not None or generation not in self._alive,
                REPLY_TIMEOUT_S)
            reply, self._reply = self._reply, None
        if reply is None:
            proc.kill()
        return reply

    def _read(self, proc: subprocess.Popen[bytes], generation: int) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                with self._changed:
                    if "exit" in message:
                        self._exits[int(message["exit"])] = int(message["code"])
                    else:
                        self._reply = message
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


def _running(pid: int) -> bool:
    from jobs.launcher import find  # which imports this module

    return find(pid, None) is not None


if __name__ == "__main__":
    sys.exit(main())
