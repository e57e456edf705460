"""Followed jobs for `/events`: one watch per job in this worker, shared by its followers.

Every writer replaces a job file by a rename in the job's folder, so a change notification
of that folder (`jobs.api.inotify`) wakes the job's watch at once; it reads the file once,
encodes what changed since its previous read, and hands that event to all followers, so a
follower costs a wake-up per change. A follower whose last state is not that previous read
(it joined since, or fell behind) encodes its own change from what it last sent.
A poll runs beside the notification: slow where notifications work, `EVENT_POLL_S` where
there are none (other platforms, OFFLOAD_EVENT_NOTIFY=0), so a missed notification costs
latency, never an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from jobs import protocol as p
from jobs.api.inotify import FolderNotifier, open_notifier
from jobs.settings import EVENT_CHECK_S, EVENT_POLL_S, KEEPALIVE_S, NOTIFIER_LINGER_S
from jobs.store.job_store import JobNotFound
from jobs.store.reading import Signature, stat_signature

log = logging.getLogger(__name__)

Reader = Callable[[str], Awaitable[dict[str, Any]]]
Encoder = Callable[[dict[str, Any], dict[str, Any]], str | None]  # (before, after)


def file_signature(path: str) -> Signature:
    try:
        return stat_signature(os.stat(path))
    except OSError:
        return (0, 0, 0)


class JobWatch:
    """A job file's latest state for its followers; `version` grows with each one, `beats`
    with each keep-alive, and `ended` says no more will come. `text` is the change from
    `base` (the state before, None at the first read) to `snapshot`, or None."""

    def __init__(self, job_id: str, path: str, read: Reader, encode: Encoder) -> None:
        self.job_id = job_id
        self.path = path
        self.followers = 0
        self.version = 0
        self.text: str | None = None
        self.base: dict[str, Any] | None = None
        self.snapshot: dict[str, Any] | None = None
        self.final = False
        self.beats = 0
        self.ended = False
        self.notified = False  # a folder notification stands behind the poll
        self.wd: int | None = None
        self._read = read
        self._encode = encode
        self._signature = file_signature(path)
        self._poked = asyncio.Event()
        self._published = asyncio.Event()  # replaced at each publication; the old one set
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self._poked.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"following {self.job_id}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def end(self) -> None:
        """Ended now, whatever its task is doing: its followers see `ended` at once."""
        self.stop()
        self.ended = True
        self._publish()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self, version: int, beats: int) -> None:
        """Until there is something past `version` and `beats`, or the watch ended."""
        while self.version == version and self.beats == beats and not self.ended:
            await self._published.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        try:
            while True:
                self._poked.clear()  # before the look: a write after it pokes again
                signature = file_signature(self.path)
                if signature != self._signature and await self._take(signature):
                    quiet_since = loop.time()
                    if self.final:
                        return
                elif loop.time() - quiet_since >= KEEPALIVE_S:
                    self.beats += 1
                    self._publish()
                    quiet_since = loop.time()
                timer = loop.call_later(EVENT_CHECK_S if self.notified else EVENT_POLL_S,
                                        self._poked.set)
                try:
                    await self._poked.wait()
                finally:
                    timer.cancel()
        except JobNotFound:
            pass  # removed while followed: the streams end
        finally:
            self.ended = True
            self._publish()

    async def _take(self, signature: Signature) -> bool:
        """Read the changed file and publish it; False if it could not be read now (an
        error such as running out of descriptors is tried again, not fatal to followers)."""
        try:
            job = await self._read(self.job_id)
        except JobNotFound:
            raise
        except Exception as exc:
            log.warning("following job %s: %s; trying again", self.job_id, exc)
            return False
        self._signature = signature
        text = None if self.snapshot is None else self._encode(self.snapshot, job)
        if self.snapshot is not None and text is None:
            return True  # written again, the same
        self.base, self.snapshot, self.text = self.snapshot, job, text
        self.final = job.get(p.F_STATE) in p.FINAL_STATES
        self.version += 1
        self._publish()
        return True

    def _publish(self) -> None:
        published, self._published = self._published, asyncio.Event()
        published.set()


class Followed:
    """The watched jobs of one event loop; a job's watch starts with its first follower
    and stops after its last, and the notifier is closed once no job has been watched for
    `linger_s` (opened and closed for each job followed in turn, its closes would pile up)."""

    def __init__(self, on_empty: Callable[[], object] | None = None,
                 linger_s: float = NOTIFIER_LINGER_S) -> None:
        self.watches: dict[str, JobWatch] = {}
        self.notifier: FolderNotifier | None = None
        self.closed: asyncio.Future[None] | None = None  # the last notifier's close
        self._on_empty = on_empty
        self._linger_s = linger_s
        self._linger: asyncio.TimerHandle | None = None

    def join(self, job_id: str, path: str, read: Reader, encode: Encoder,
             notify: bool) -> JobWatch:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        watch = self.watches.get(job_id)
        if watch is None or watch.ended:  # an ended one lingers while a follower drains it
            watch = JobWatch(job_id, path, read, encode)
            if notify:
                self._notify(watch)
            self.watches[job_id] = watch
            watch.start()
        watch.followers += 1
        if stopping():  # a stream whose route ran before the stop began: it ends too
            watch.end()
        return watch

    def leave(self, watch: JobWatch) -> None:
        watch.followers -= 1
        if watch.followers > 0:
            return
        watch.stop()
        # One replaced by a newer watch of the same job leaves the folder's to that one.
        if self.watches.get(watch.job_id) is watch:
            del self.watches[watch.job_id]
            if self.notifier is not None and watch.wd is not None:
                self.notifier.remove(watch.wd)
        if not self.watches and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(self._linger_s, self.close)

    def close(self) -> None:
        """The notifier closed now (the last watch gone, or the app stopping)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.notifier is not None:
            self.closed = self.notifier.close()
            self.notifier = None
        if self._on_empty is not None:
            self._on_empty()

    def _notify(self, watch: JobWatch) -> None:
        if self.notifier is None:
            self.notifier = open_notifier(asyncio.get_running_loop())
        if self.notifier is not None:
            watch.wd = self.notifier.add(os.path.dirname(watch.path), p.JOB_FILE, watch.poke)
            watch.notified = watch.wd is not None


# Kept until its notifier is closed (a test may run several servers, each on its own loop).
_by_loop: dict[asyncio.AbstractEventLoop, Followed] = {}
# The loops whose server is stopping: their streams and waits have ended, none starts.
_stopping: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def end_following() -> None:
    """The server begins to stop: every event stream and wait of this loop ends now, and
    none starts (their clients come back to the next server), rather than holding the
    stop for its whole grace and being cancelled at its end."""
    loop = asyncio.get_running_loop()
    _stopping.add(loop)
    registry = _by_loop.get(loop)
    if registry is not None:
        for watch in list(registry.watches.values()):
            watch.end()


def stopping() -> bool:
    """Whether this loop's server has begun to stop (`end_following`)."""
    return asyncio.get_running_loop() in _stopping


def start_following() -> None:
    """A server starts on this loop (after another stopped on it: a test's, say)."""
    _stopping.discard(asyncio.get_running_loop())


async def stop_following() -> None:
    """This event loop's notifier closed, for an app that stops (its streams end)."""
    registry = _by_loop.get(asyncio.get_running_loop())
    if registry is not None:
        registry.close()
        if registry.closed is not None:
            await registry.closed


def followed() -> Followed:
    """This event loop's followed jobs."""
    loop = asyncio.get_running_loop()
    registry = _by_loop.get(loop)
    if registry is None:
        made = Followed(on_empty=lambda: _forget(loop, made))
        registry = _by_loop[loop] = made
    return registry


def _forget(loop: asyncio.AbstractEventLoop, registry: Followed) -> None:
    """`registry` no longer this loop's, unless a newer one has taken its place."""
    if _by_loop.get(loop) is registry:
        del _by_loop[loop]
