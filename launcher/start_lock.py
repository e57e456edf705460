"""One start at a time in a folder: a second waits for the first's server."""

from __future__ import annotations

import contextlib
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
        lock = open(START_LOCK, "a+b")  # noqa: SIM115 - held past this frame, closed below
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
