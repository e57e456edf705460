"""One start at a time in a folder: a second waits for the first's server."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

from launcher import ROOT, say

START_LOCK = ROOT / ".launch.lock"  # held by the start that installs and starts the server


@contextlib.contextmanager
def one_start_at_a_time() -> Iterator[Callable[[], None]]:
    """Held from the check for a running Offload until this start's server answers (or
    its install is done, for `test`): a second start meanwhile (a double click twice)
    waits, then finds that server, instead of making .venv again under the first one's
    install. Yields the release, for the caller to let go sooner; the lock goes with the
    process however it ends."""
    try:
        lock = _open_lock()
    except OSError:  # a read-only folder: .venv cannot be made there either, and says so
        yield lambda: None
        return
    if not _try_lock(lock):
        say("another start of Offload in this folder is installing or starting it; waiting "
            "for it")
        while not _try_lock(lock):
            time.sleep(0.5)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            lock.close()  # closing the file lets go of its lock

    try:
        yield release
    finally:
        release()


def _open_lock() -> IO[bytes]:
    """The lock file, which only this account can open: flock needs no right to write,
    so any account that could open it held it, and every start waited for good."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(START_LOCK, flags, 0o600)
    if os.name == "nt" or _ours_alone(fd):
        return os.fdopen(fd, "a+b")
    os.close(fd)
    # Left open by an earlier version: another account may hold it open already, so a
    # new file of ours alone takes its place (changing its mode would not close theirs).
    fresh = START_LOCK.with_name(f"{START_LOCK.name}.{os.getpid()}")
    fd = os.open(fresh, flags | os.O_TRUNC, 0o600)
    if _ours_alone(fd):
        os.replace(fresh, START_LOCK)
        return os.fdopen(fd, "a+b")
    # Made 0600 and open to all: a file system without modes (FAT, SMB), where no mode
    # keeps another account out, so the lock there serves as it is.
    os.close(fd)
    os.unlink(fresh)
    return os.fdopen(os.open(START_LOCK, flags, 0o600), "a+b")


def _ours_alone(fd: int) -> bool:
    return not stat.S_IMODE(os.fstat(fd).st_mode) & 0o077


def _try_lock(lock: IO[bytes]) -> bool:
    try:
        if sys.platform == "win32":
            import msvcrt
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
