"""What wakes the supervisor for a pass, and what the pass is to look at.

A ring on the doorbell names one job (submitted or cancelled): the pass looks at that
job alone. A cancel ring (its stop request could not be written) also asks the pass to
stop that job. A poke through the wake file (no socket, or its queue full) names none: the
pass looks at every job. A nudge (a runner exited, a stop ended) names none either, but
asks for no full pass: it reaps and launches. Rings arrive on the event loop's thread,
nudges from any thread; the pass runs on a worker thread and takes what was asked.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from jobs import protocol as p
from jobs.protocol.wake import ALL_JOBS, CANCEL_RING, Doorbell, wake_file
from jobs.settings import WAKE_POLL_S


class Wakeups:
    """What asks for the next pass, and what that pass is to look at."""

    def __init__(self, jobs_dir: Path) -> None:
        self._wake_file = wake_file(jobs_dir)
        self._doorbell = Doorbell(jobs_dir)
        self._lock = threading.Lock()
        self._hinted: set[str] = set()  # jobs an event named since the last pass
        self._cancels: set[str] = set()  # jobs a cancel ring named since the last pass
        self._full_wanted = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop that drives the passes, before the first."""
        self._loop, self._event = loop, asyncio.Event()

    def want(self, job_id: str = ALL_JOBS) -> None:
        """The next pass looks at `job_id`; without one, at every job."""
        with self._lock:
            if p.is_valid_id(job_id):
                self._hinted.add(job_id)
            else:
                self._full_wanted = True

    def take(self) -> tuple[set[str], bool, set[str]]:
        """For a pass: the jobs named since the last, whether a full pass was asked, and
        the jobs to cancel though their stop request is not on disk."""
        with self._lock:
            hinted, self._hinted = self._hinted, set()
            full, self._full_wanted = self._full_wanted, False
            cancels, self._cancels = self._cancels, set()
        return hinted, full, cancels

    def nudge(self) -> None:
        """A pass now, from any thread."""
        loop, event = self._loop, self._event
        if loop is None or event is None or loop.is_closed():
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            event.set()
        else:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # the loop closed meanwhile

    def before_pass(self) -> None:
        """On the loop's thread: what asks for a pass from here on ends the next sleep
        (a runner that exits during this pass gets the next one at once)."""
        assert self._event is not None
        self._event.clear()

    async def sleep(self, delay: float, leading: bool) -> None:
        """Until `delay` passes, a nudge, or (`leading`) a ring or a poke."""
        assert self._event is not None and self._loop is not None
        if leading and not self._doorbell.tried:
            self._doorbell.listen(self._loop, self._on_ring)
        # A ring sets the event; a poke through the file shows in the file's mtime.
        deadline = time.monotonic() + delay
        poked = _mtime_ns(self._wake_file)
        while (left := deadline - time.monotonic()) > 0:
            if await _set_within(self._event, min(left, WAKE_POLL_S)):
                return
            if leading and _mtime_ns(self._wake_file) != poked:
                self.want(ALL_JOBS)  # a poke through the file names no job
                return

    def _on_ring(self, text: str) -> None:
        job_id = text.removeprefix(CANCEL_RING)
        if job_id != text and p.is_valid_id(job_id):
            with self._lock:
                self._cancels.add(job_id)
        self.want(job_id)
        if self._event is not None:
            self._event.set()

    def close(self, unlink: bool) -> None:
        """Stop listening; `unlink`: remove the socket too (not another leader's)."""
        self._doorbell.close(self._loop, unlink=unlink)


async def _set_within(event: asyncio.Event, timeout: float) -> bool:
    """Whether `event` is set within `timeout` s. Not `asyncio.wait_for`: before Python
    3.12 it swallows a cancel that comes as the event is set (a runner's exit as a
    SIGTERM), and the stopped supervisor led on."""
    waiting = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait((waiting,), timeout=timeout)
    finally:
        waiting.cancel()
    return bool(done)


def _mtime_ns(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0
