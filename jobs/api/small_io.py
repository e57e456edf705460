"""File operations of the API run right on the event loop while the disk is quick, and
in worker threads for a while once it is not."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

INLINE_MAX_S = 0.005  # a file operation run on the event loop must take less than this
INLINE_PAUSE_S = 60.0  # after one that took longer, worker threads for this long
# One slow operation is a hiccup (an fsync after a quiet spell); another this soon after
# the last says the disk is slow, a warning.
SLOW_AGAIN_S = 600.0
# Under it, a busy CPU (a share of two cores) explains the time as well as a disk does:
# said once a minute on a loaded machine with a local disk, as a warning, it cried wolf.
SLOW_DISK_S = 0.05

log = logging.getLogger(__name__)
T = TypeVar("T")


class SmallIO:
    """Runs a small file operation right on the event loop while such operations take
    under INLINE_MAX_S, and in worker threads for a while after one that did not.

    Writing a job (a folder and a 1 KB file) is far quicker than the hop to a worker
    thread and back, which costs two thread wake-ups (docs/benchmarks.md). A slow or
    remote disk (an operation over INLINE_MAX_S) sends these operations to worker threads
    for INLINE_PAUSE_S.
    """

    def __init__(self) -> None:
        # Monotonic time from which operations may run inline. Never on Windows: a file
        # being replaced there refuses readers for a moment (read_json sleeps and retries),
        # and virus scanners make opening a file slow.
        self._inline_from = 0.0 if os.name == "posix" else math.inf
        self._slow_at: float | None = None  # monotonic time of the last slow operation

    async def run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        if time.monotonic() < self._inline_from:
            return await run_in_threadpool(func, *args)
        started = time.perf_counter()
        try:
            return func(*args)
        finally:
            took = time.perf_counter() - started
            if took > INLINE_MAX_S:
                now = time.monotonic()
                again = (self._slow_at is not None and now - self._slow_at < SLOW_AGAIN_S
                         and took > SLOW_DISK_S)
                self._slow_at, self._inline_from = now, now + INLINE_PAUSE_S
                log.log(logging.WARNING if again else logging.INFO,
                        "%s took %.1f ms%s; the API touches job files from worker threads "
                        "for the next %.0f s", what, took * 1000,
                        ", again: is the data folder on a slow disk?" if again else "",
                        INLINE_PAUSE_S)
