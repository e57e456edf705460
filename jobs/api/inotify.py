"""Change notifications for job folders from Linux's inotify, read on the event loop.

Our own few lines over ctypes rather than `watchfiles`: its `awatch` holds a thread of
anyio's shared pool (40 by default, the same pool the API's file reads use) per watched
folder, and its Rust loop wakes every `step` milliseconds to look for changes, so a 1 ms
step costs CPU per followed job even when nothing is written (docs/benchmarks.md). An
inotify descriptor on the event loop costs nothing while nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import struct
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # the same flag on Linux
IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# A replace by rename (every writer of a job file), an in-place write, a removal.
WATCH_MASK = IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
FOLDER_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (of the name that follows)


class FolderNotifier:
    """Calls a folder's callback when the named file in it is replaced, written or
    removed, or the folder itself goes; every callback when the kernel's queue
    overflowed (changes were dropped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._callbacks: dict[int, tuple[bytes, Callable[[], None]]] = {}
        loop.add_reader(fd, self._drain)

    def add(self, folder: str, name: str, callback: Callable[[], None]) -> int | None:
        """A watch descriptor, or None when the kernel refuses one (max_user_watches)."""
        wd = int(_libc().inotify_add_watch(self._fd, os.fsencode(folder), WATCH_MASK))
        if wd < 0:
            log.debug("no inotify watch for %s: %s", folder, os.strerror(ctypes.get_errno()))
            return None
        self._callbacks[wd] = (os.fsencode(name), callback)
        return wd

    def remove(self, wd: int) -> None:
        if self._callbacks.pop(wd, None) is not None:
            _libc().inotify_rm_watch(self._fd, wd)  # fails harmlessly if the folder went

    def close(self) -> asyncio.Future[None]:
        """Done once the descriptor is closed: in a worker thread, as the kernel makes that
        close wait for its readers, and the event loop must not."""
        self._loop.remove_reader(self._fd)
        self._callbacks.clear()
        return self._loop.run_in_executor(None, os.close, self._fd)

    def _drain(self) -> None:
        due: set[Callable[[], None]] = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            due |= self._parse(data)
        for callback in due:
            callback()

    def _parse(self, data: bytes) -> set[Callable[[], None]]:
        due: set[Callable[[], None]] = set()
        offset = 0
        while offset + EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
            name = data[offset + EVENT_HEADER.size:offset + EVENT_HEADER.size + length]
            offset += EVENT_HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                due.update(callback for _, callback in self._callbacks.values())
                continue
            watched = self._callbacks.get(wd)
            if watched is not None and (mask & FOLDER_GONE or name.rstrip(b"\0") == watched[0]):
                due.add(watched[1])
        return due


def open_notifier(loop: asyncio.AbstractEventLoop) -> FolderNotifier | None:
    """A notifier on this loop, or None where there is none (not Linux, no inotify, the
    per-user limit of instances reached, a loop that cannot watch a descriptor)."""
    if sys.platform != "linux":
        return None
    try:
        fd = int(_libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    try:
        return FolderNotifier(loop, fd)
    except (NotImplementedError, OSError):
        with contextlib.suppress(OSError):
            os.close(fd)
        return None


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # the process's own C library: no search
