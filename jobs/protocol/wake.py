"""The supervisor's files beside the job folder: the lock that elects one leading
supervisor among the API workers' keepers, the doorbell any process rings to make the
leader look at a job now, and the file its raw output goes to.

The doorbell (POSIX): the leader listens on a Unix datagram socket,
`<data>/supervisor.sock`, its owner's only; a ring is one datagram holding the job's id,
so the leader reads that job alone instead of listing the folder. Where there is no
socket (Windows; a data folder whose path is too long for a socket address; no leader
listening yet; its queue full) a ring appends a byte to `<data>/supervisor.wake`, whose
mtime the leader polls, and the leader then looks at every job. A cancel whose stop
request cannot be written (a full disk) rings `cancel <id>`: the leader stops that job
from memory; that ring has no file to fall back on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# The supervisor's stdout and stderr: what is not a log record (a crash's traceback, the
# fork server's complaints); its keeper opens it, the supervisor caps it.
OUTPUT_FILE = "supervisor.out"
SOCKET_FILE = "supervisor.sock"
WAKE_FILE = "supervisor.wake"
CAN_LISTEN = sys.platform != "win32" and hasattr(socket, "AF_UNIX")
# Everything about the folder (a ring from the wake file says no more than that).
ALL_JOBS = ""
RING_READ = 64  # bytes read per ring: an id, and room to tell a longer datagram apart
CANCEL_RING = "cancel "  # before a job's id: stop it, though its stop request is not on disk

_sender: socket.socket | None = None
_sender_lock = threading.Lock()


def wake_file(jobs_dir: Path) -> Path:
    return jobs_dir.parent / WAKE_FILE


def lock_file(jobs_dir: Path) -> Path:
    return jobs_dir.parent / "supervisor.lock"


def socket_file(jobs_dir: Path) -> Path:
    return jobs_dir.parent / SOCKET_FILE


def poke(jobs_dir: Path, job_id: str = ALL_JOBS) -> None:
    """Wake the leading supervisor from any process, to look at `job_id` (submitted or
    cancelled) or, without one, at every job."""
    if _ring(socket_file(jobs_dir), job_id):
        return
    path = wake_file(jobs_dir)
    try:
        with open(path, "ab") as f:
            f.write(b".")
            if f.tell() > 4096:
                f.truncate(0)
    except OSError as exc:
        log.debug("cannot poke the supervisor: %s", exc)


def ring_cancel(jobs_dir: Path, job_id: str) -> bool:
    """Ask the leading supervisor to cancel `job_id` whose stop request could not be
    written (a full disk): True if its socket took the ring. It then stops the job as if
    the request were there, and its final state is written once there is room."""
    return _ring(socket_file(jobs_dir), CANCEL_RING + job_id)


def _ring(path: Path, text: str) -> bool:
    """True if the leader's socket took the ring."""
    global _sender
    if sys.platform == "win32" or not CAN_LISTEN:
        return False
    try:
        with _sender_lock:
            if _sender is None:
                _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                _sender.setblocking(False)
                atexit.register(_sender.close)
        _sender.sendto(text.encode("ascii"), str(path))
    except BlockingIOError:
        # Its queue is full: it has rings to read, but this one may be lost; the wake
        # file, which the leader also watches, asks for a look at every job.
        return False
    except OSError:
        return False  # no leader listening (ENOENT, ECONNREFUSED), or too long a path
    return True


class Doorbell:
    """The leader's end: `on_ring(text)` for every ring: a job's id (ALL_JOBS: look at
    all), or CANCEL_RING and an id."""

    def __init__(self, jobs_dir: Path) -> None:
        self.path = socket_file(jobs_dir)
        self._sock: socket.socket | None = None
        self.tried = False  # once per leadership: a socket that cannot be bound stays so

    def listen(self, loop: asyncio.AbstractEventLoop, on_ring: Callable[[str], None]) -> bool:
        """Bind the socket and read its rings on `loop`. Only the leader calls this: it
        holds the supervisor lock, so a socket file already there is a dead leader's."""
        self.tried = True
        if sys.platform == "win32" or not CAN_LISTEN:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            sock.setblocking(False)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)  # as every file Offload makes: its owner's only
        except OSError as exc:  # e.g. the path is longer than a socket address allows
            sock.close()
            log.info("no doorbell socket (%s): woken by %s instead", exc, WAKE_FILE)
            return False
        loop.add_reader(sock.fileno(), self._drain, sock, on_ring)
        self._sock = sock
        return True

    @staticmethod
    def _drain(sock: socket.socket, on_ring: Callable[[str], None]) -> None:
        while True:
            try:
                data = sock.recv(RING_READ)
            except OSError:
                return  # BlockingIOError once every ring is read
            on_ring(data.decode("ascii", "replace"))

    def close(self, loop: asyncio.AbstractEventLoop | None, unlink: bool = True) -> None:
        """`unlink` False: the path may be another leader's socket now."""
        self.tried = False
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if loop is not None and not loop.is_closed():
            loop.remove_reader(sock.fileno())
        sock.close()
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
