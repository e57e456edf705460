"""A child of the fork server (`jobs.launch.forkserver`): forked ahead to wait for its
job, or forked for a request at hand, it leaves the server behind and becomes the runner.

Imported by the server before it forks: a forked child runs this code without opening a
module file (each page it touches after the fork is a copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
from typing import Any

from jobs import protocol as p
from jobs.launch.warm import TITLE_ROOM_ENV, show_command_line

PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # a longer pipe write may be cut short


class Ahead:
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


def fork_waiting_child(replies: int, server_fds: tuple[int, ...]) -> Ahead | dict[str, Any]:
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
        return Ahead(pid, to_child)
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
                send(replies, {"error": str(exc)})
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


def fork_for_request(request: dict[str, Any], stale: bool, replies: int,
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
    send(replies, {"pid": os.getpid()})
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


def send(replies: int, message: dict[str, Any]) -> None:
    """One JSON line to the supervisor, on the reply pipe of the server and its children."""
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(replies, data):]
