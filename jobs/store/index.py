"""The in-memory index over the job folder: what listing, counting and pruning need.

It keeps a few fields of every job and the whole job only for live ones and the most
recently read finished ones, so memory stays flat at any number of jobs. A refresh
lists the folder only when it changed and reads only the files of live jobs that
changed: finished job files are never rewritten.
"""

from __future__ import annotations

import bisect
import math
import os
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobs import protocol as p
from jobs.models import Job
from jobs.protocol import control

SETTLE_S = 5.0  # a finished job file this long unchanged is never looked at again
DIR_SETTLE_S = 0.1  # a folder listing is trusted once the folder's mtime is this old
RELIST_S = 10.0  # and listed again at least this often anyway
RECENT_KEPT = 256  # finished jobs kept whole in memory, most recently read, at least
SNAPSHOT_JOBS = 50  # newest jobs in the snapshot that `refresh` leaves for the event loop


class _Live:
    """What only a live (or just finished) job needs: its file's signature and data."""

    __slots__ = ("signature", "mtime_ns", "data")

    def __init__(self, st: os.stat_result, data: dict[str, Any]) -> None:
        self.signature = stat_signature(st)
        self.mtime_ns = st.st_mtime_ns
        self.data = data


Signature = tuple[int, int, int]


def stat_signature(st: os.stat_result) -> Signature:
    """A job file's identity: every write replaces the file (a new inode), and two writes
    within one clock tick of the same size keep mtime and size."""
    return st.st_ino, st.st_mtime_ns, st.st_size


class UnknownCursor(ValueError):
    """A listing's `before` names no job the index holds."""


class _Entry:
    """What the index keeps of one job: enough to list, count and prune it. A settled
    job's entry is a few pointers (its strings are shared), so thousands cost little."""

    __slots__ = ("state", "kind", "finished_ts", "session", "live")

    def __init__(self, data: dict[str, Any], live: _Live | None) -> None:
        self.state = sys.intern(str(data.get(p.F_STATE)))
        self.kind = sys.intern(str(data.get(p.F_KIND)))
        finished = data.get(p.F_FINISHED_AT) or data.get(p.F_CREATED_AT)
        try:
            self.finished_ts = p.parse_iso(str(finished))
        except ValueError:
            self.finished_ts = 0.0
        self.session = p.chat_session(self.kind, data.get(p.F_INPUT))
        self.live = live


@dataclass(frozen=True)
class Load:
    """What admitting a submission needs: the jobs by state, and when the finished ones
    finished (POSIX times, ascending)."""

    counts: dict[str, int]
    finished: array[float]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def finished_before(self, cutoff: float) -> int:
        return bisect.bisect_left(self.finished, cutoff)


class DirListing:
    """The job ids in a folder, listed again only when the folder changed.

    A folder's mtime moves when an entry is added or removed, but in coarse ticks: a
    listing is trusted only once the mtime it saw is older than DIR_SETTLE_S, and
    never for longer than RELIST_S (file systems that do not keep folder mtimes).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._mtime_ns: int | None = None
        self._stable = False
        self._listed_at = 0.0

    def changed(self, known: AbstractSet[str] = frozenset()) -> set[str] | None:
        """The ids in the folder if it may have changed since the last call, else None.
        `known`: names known to be job ids, not checked again (with thousands of jobs
        kept, checking each name cost more than listing the folder)."""
        try:
            st = os.stat(self.folder)
        except FileNotFoundError:
            self._mtime_ns, self._stable = None, False
            return set()
        now = time.monotonic()
        if self._stable and st.st_mtime_ns == self._mtime_ns and now - self._listed_at < RELIST_S:
            return None
        listed = set(os.listdir(self.folder))
        names = (listed & known) | {name for name in listed - known if p.is_valid_id(name)}
        self._mtime_ns = st.st_mtime_ns
        self._stable = time.time() - st.st_mtime > DIR_SETTLE_S
        self._listed_at = now
        return names


class JobIndex:
    """Jobs newest first, counts by state, queue positions, sessions, what to prune;
    safe to use from several threads."""

    def __init__(self, jobs_dir: Path, kind_caps: dict[str, int] | None = None) -> None:
        self.dir = jobs_dir
        # OFFLOAD_KIND_CAPS (those set while running, in `queue.cap`, go over them): a job
        # its kind's cap holds back has no place in the queue, as the supervisor sets it aside.
        self.kind_caps = dict(kind_caps or {})
        self._lock = threading.Lock()  # routes use the store from several worker threads
        self._listing = DirListing(jobs_dir)
        self._entries: dict[str, _Entry] = {}
        # Submission order: ids and their creation times, ascending (removed ids linger
        # until the next _drop_removed_from_order).
        self._order_ns = array("q")
        self._order_ids: list[str] = []
        self._order_dirty = False
        self._counts: dict[str, int] = {state.value: 0 for state in p.JobState}
        self._live_counts: dict[tuple[str, str], int] = {}  # (kind, state): queued, running
        self._finished = array("d")  # the finish times of finished jobs, ascending
        self._watched: set[str] = set()  # live or just finished: looked at every refresh
        self._missing: set[str] = set()  # a folder without its job file (yet)
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # settled jobs read
        # As many as the longest listing asked for (the API's limit bounds it): a listing
        # longer than the cache evicted, newest first, what the next one needed first, so
        # every job of each such listing was read from disk again, under the lock.
        self._recent_kept = RECENT_KEPT
        self._refreshed_at: float | None = None
        self._snapshot: tuple[float, list[dict[str, Any]], Load] | None = None
        # The jobs this process stored that the last refresh did not list yet (by when):
        # the snapshot's load counts them queued, so that a client sending one job after
        # another cannot pass a limit on it.
        self._unlisted: dict[str, float] = {}
        self._unlisted_lock = threading.Lock()  # held for no I/O: the event loop takes it
        # The queue's positions, as of a refresh (`_refreshed_at`): computed once for the
        # many reads of queued jobs that a refresh serves.
        self._positions: tuple[float | None, dict[str, int]] = (None, {})
        # The tokens of the chats that completed since this index began, each counted
        # once (its id kept while its job is); never lowered, not even by pruning.
        self._since = time.time() - 0.001  # finish times are rounded to the millisecond
        self._usage = dict.fromkeys(("chats", "prompt_tokens", "completion_tokens"), 0)
        self._usage_counted: set[str] = set()
        # Each chat session's newest job (by submission) and its queued or running ones.
        self._session_newest: dict[str, tuple[tuple[int, str], str]] = {}
        self._session_live: dict[str, set[str]] = {}

    # -- queries -------------------------------------------------------------------

    def list_jobs(self, state: str | None = None, kind: str | None = None,
                  limit: int = 100, max_age_s: float = 0.0,
                  before: str | None = None) -> list[dict[str, Any]]:
        """Newest first, with queue positions filled in for queued jobs; with `before`,
        those submitted before that job (the next page of a listing)."""
        with self._lock:
            self._refresh(max_age_s)
            return self._newest(state, kind, limit, before)

    def counts(self, max_age_s: float = 0.0) -> dict[str, int]:
        with self._lock:
            self._refresh(max_age_s)
            return dict(self._counts)

    def live_counts(self, max_age_s: float = 0.0) -> dict[tuple[str, str], int]:
        """The queued and running jobs by kind and state."""
        with self._lock:
            self._refresh(max_age_s)
            return dict(self._live_counts)

    def overview(self, limit: int, max_age_s: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The newest jobs and the counts by state."""
        with self._lock:
            self._refresh(max_age_s)
            return self._newest(None, None, limit), dict(self._counts)

    def load(self, max_age_s: float = 0.0) -> Load:
        with self._lock:
            self._refresh(max_age_s)
            return Load(dict(self._counts), self._finished[:])

    def refresh(self) -> None:
        """Bring the index up to date, and keep a snapshot of the newest jobs and the
        load that `cached_overview` and `cached_load` answer from without the lock."""
        with self._lock:
            self._refresh(0.0)
            with self._unlisted_lock:
                self._unlisted = {job_id: at for job_id, at in self._unlisted.items()
                                  if job_id not in self._entries}  # else listed now
            jobs = self._newest(None, None, SNAPSHOT_JOBS)
            # Copying the finish times is a memcpy: about 20 microseconds at 20,000 jobs.
            load = Load(dict(self._counts), self._finished[:])
            self._queue_positions()
            self._snapshot = (time.monotonic(), jobs, load)

    def cached_overview(self, limit: int, max_age_s: float
                        ) -> tuple[list[dict[str, Any]], dict[str, int]] | None:
        """`overview` from the last `refresh` if it is recent enough, else None; never
        touches the disk and never waits for the lock (it is meant for the event loop)."""
        snapshot = self._snapshot
        if (snapshot is None or limit > SNAPSHOT_JOBS
                or time.monotonic() - snapshot[0] > max_age_s):
            return None
        return snapshot[1][:limit], dict(snapshot[2].counts)

    def cached_load(self, max_age_s: float) -> Load | None:
        """`load` from the last `refresh` if it is recent enough, else None (like
        `cached_overview`: for the event loop)."""
        snapshot = self._snapshot
        if snapshot is None or time.monotonic() - snapshot[0] > max_age_s:
            return None
        load, unlisted = snapshot[2], len(self._unlisted)
        if not unlisted:
            return load
        queued = p.JobState.QUEUED.value
        return Load({**load.counts, queued: load.counts.get(queued, 0) + unlisted},
                    load.finished)

    def stored(self, job_id: str) -> None:
        """A job this process stored: counted in `cached_load` until a refresh lists it."""
        now = time.monotonic()
        with self._unlisted_lock:
            # Oldest first, those RELIST_S old go: removed meanwhile, or stored by a process
            # whose index is never refreshed (the supervisor's schedules).
            while self._unlisted:
                oldest, at = next(iter(self._unlisted.items()))
                if now - at <= RELIST_S:
                    break
                del self._unlisted[oldest]
            self._unlisted[job_id] = now

    def queue_position(self, job_id: str, max_age_s: float = 0.0) -> int | None:
        """Its place in the queue, counted at most `max_age_s` ago (a job queued since
        is counted now)."""
        with self._lock:
            self._refresh(max_age_s)
            position = self._queue_positions().get(job_id)
            if position is None and max_age_s > 0:
                if job_id in self._entries:
                    self._refresh(0.0)
                else:  # queued since the last look: read alone, not with every live job
                    self._load(job_id)
                    entry = self._entries.get(job_id)
                    if entry is not None and entry.live is not None and any(
                            other not in self._entries for other in _awaited(entry.live.data)):
                        self._refresh(0.0)  # and a job it waits for, as new
                    self._positions = (None, {})
                position = self._queue_positions().get(job_id)
            return position

    def cached_queue_position(self, job_id: str, max_age_s: float) -> int | None:
        """`queue_position` from the last `refresh` if it is recent enough and knew the
        job, else None; like `cached_load`, for the event loop."""
        snapshot, (counted_at, positions) = self._snapshot, self._positions
        if snapshot is None or time.monotonic() - snapshot[0] > max_age_s:
            return None
        return positions.get(job_id) if counted_at is not None else None

    def session_jobs(self, session_id: str) -> list[dict[str, Any]]:
        """A chat session's jobs, oldest first."""
        with self._lock:
            self._refresh(0.0)
            self._drop_removed_from_order()
            found = [i for i in self._order_ids if self._entries[i].session == session_id]
            jobs = (self._data(i, self._entries[i]) for i in found)
            return [job for job in jobs if job is not None]

    def session_turn(self, session_id: str) -> tuple[str | None, list[str]]:
        """A chat session's newest job and its queued or running ones, counted now."""
        with self._lock:
            self._refresh_session(session_id)
            newest = self._session_newest.get(session_id)
            return (newest[1] if newest else None), sorted(self._session_live.get(session_id, ()))

    def needing(self, job_id: str) -> list[str]:
        """The live jobs that need `job_id`, counted now, oldest first: those that depend
        on it (a running one may be queued again for another attempt) and, for a chat's
        turn, the turns of its conversation not ended (the earlier ones are their context)."""
        with self._lock:
            self._refresh(0.0)
            entry = self._entries.get(job_id)
            session = entry.session if entry is not None else None
            needing = sorted(p.fifo_key(live.data) for i in self._watched
                             if (live := self._entries[i].live) is not None
                             and self._entries[i].state in (p.JobState.QUEUED,
                                                            p.JobState.RUNNING)
                             and (job_id in p.dependencies(live.data)
                                  or (session is not None
                                      and self._entries[i].session == session)))
            return [each for _, each in needing if each != job_id]

    def prunable(self, cutoff: float, max_jobs: int | None,
                 young: float = math.inf, keep: frozenset[str] | set[str] = frozenset()
                 ) -> set[str]:
        """Finished jobs that finished before `cutoff`, then the oldest finished ones
        beyond `max_jobs` jobs in all; never one that finished at `young` or later, nor
        one in `keep` (the next oldest goes in its place)."""
        with self._lock:
            self._refresh(0.0)
            self._drop_removed_from_order()
            finished = [i for i in self._order_ids if self._entries[i].state in p.FINAL_STATES
                        and self._entries[i].finished_ts < young and i not in keep]
            doomed = {job_id for job_id in finished
                      if self._entries[job_id].finished_ts < cutoff}
            if max_jobs is not None:
                excess = len(self._entries) - len(doomed) - max_jobs
                for job_id in finished:
                    if excess <= 0:
                        break
                    if job_id not in doomed:
                        doomed.add(job_id)
                        excess -= 1
        return doomed

    def usage_totals(self) -> dict[str, Any]:
        """The chats completed since this index began and their tokens, as of the last
        refresh; never waits for the lock (a copy of a small dict)."""
        return {"since": p.iso(self._since), **self._usage}

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._drop(job_id)
            self._usage_counted.discard(job_id)

    # -- the index -----------------------------------------------------------------

    def _refresh(self, max_age_s: float) -> None:
        now = time.monotonic()
        if self._refreshed_at is not None and now - self._refreshed_at <= max_age_s:
            return
        self._take_listing()
        wall = time.time()
        for job_id in list(self._watched):
            self._check(job_id, wall)
        self._refreshed_at = now

    def _refresh_session(self, session_id: str) -> None:
        """`_refresh(0.0)` for one chat session's turns: the jobs added and removed, and
        the session's queued and running ones looked at again, not every live job."""
        self._take_listing()
        wall = time.time()
        for job_id in list(self._session_live.get(session_id, ())):
            if job_id in self._watched:
                self._check(job_id, wall)
        self._positions = (None, {})  # counted again: jobs may have changed since

    def _take_listing(self) -> None:
        """The jobs added to the folder and removed from it since the last listing."""
        names = self._listing.changed(self._entries.keys() | self._missing)
        if names is not None:
            for gone in (self._entries.keys() | self._missing) - names:
                self._drop(gone)
                self._usage_counted.discard(gone)  # its folder is gone: never seen again
            self._missing |= names - self._entries.keys()
        for job_id in list(self._missing):
            self._load(job_id)

    def _load(self, job_id: str) -> None:
        path = p.job_path(self.dir, job_id)
        try:
            st = _stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        data = read_job(job_id, path)
        if data is None:
            return
        self._missing.discard(job_id)
        self._put(job_id, data, _Live(st, data))

    def _check(self, job_id: str, wall: float) -> None:
        live = self._entries[job_id].live
        assert live is not None
        path = p.job_path(self.dir, job_id)
        try:
            st = _stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._drop(job_id)
            self._missing.add(job_id)
            return
        if stat_signature(st) != live.signature:
            self._load(job_id)
        elif self._entries[job_id].state in p.FINAL_STATES and wall - st.st_mtime > SETTLE_S:
            self._remember(job_id, live.data)
            self._stop_watching(job_id)

    def _stop_watching(self, job_id: str) -> None:
        """Finished and quiet: never looked at again, and kept small (the whole job is
        read again on demand)."""
        self._watched.discard(job_id)
        self._entries[job_id].live = None

    def _put(self, job_id: str, data: dict[str, Any], live: _Live) -> None:
        entry = _Entry(data, live)
        old = self._entries.get(job_id)
        if old is not None:
            self._counts[old.state] = self._counts.get(old.state, 0) - 1
            self._count_live(old, -1)
            self._unfinish(old)
        else:
            self._drop_removed_from_order()  # a dropped id that comes back must not be listed twice
            created_ns = p.fifo_key(data)[0]
            at = bisect.bisect_right(self._order_ns, created_ns)
            self._order_ns.insert(at, created_ns)
            self._order_ids.insert(at, job_id)
        self._entries[job_id] = entry
        self._counts[entry.state] = self._counts.get(entry.state, 0) + 1
        self._count_live(entry, 1)
        if entry.state in p.FINAL_STATES:
            self._finished.insert(bisect.bisect(self._finished, entry.finished_ts),
                                  entry.finished_ts)
        self._watched.add(job_id)
        if entry.session is not None:
            self._track_turn(job_id, entry, p.fifo_key(data))
        if (entry.state == p.JobState.COMPLETED and entry.kind == "chat"
                and entry.finished_ts >= self._since and job_id not in self._usage_counted):
            self._count_usage(job_id, data)
        if entry.state in p.FINAL_STATES and time.time() - live.mtime_ns / 1e9 > SETTLE_S:
            self._stop_watching(job_id)

    def _track_turn(self, job_id: str, entry: _Entry, key: tuple[int, str]) -> None:
        session = entry.session
        assert session is not None
        live = self._session_live.setdefault(session, set())
        if entry.state in p.FINAL_STATES:
            live.discard(job_id)
        else:
            live.add(job_id)
        if not live:
            del self._session_live[session]
        newest = self._session_newest.get(session)
        if newest is None or newest[0] <= key:
            self._session_newest[session] = (key, job_id)

    def _untrack_turn(self, job_id: str, entry: _Entry) -> None:
        session = entry.session
        if session is None:
            return
        live = self._session_live.get(session)
        if live is not None:
            live.discard(job_id)
            if not live:
                del self._session_live[session]
        newest = self._session_newest.get(session)
        if newest is not None and newest[1] == job_id:
            del self._session_newest[session]  # its earlier jobs, if any, are older still

    def _count_usage(self, job_id: str, data: dict[str, Any]) -> None:
        self._usage_counted.add(job_id)
        result = data.get(p.F_RESULT)
        usage = result.get("usage") if isinstance(result, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        totals = dict(self._usage)  # replaced whole: `usage_totals` reads it unlocked
        totals["chats"] += 1
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                totals[key] += usage[key]
        self._usage = totals

    def _drop(self, job_id: str) -> None:
        self._missing.discard(job_id)
        self._watched.discard(job_id)
        self._recent.pop(job_id, None)
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            self._untrack_turn(job_id, entry)
            self._counts[entry.state] -= 1
            self._count_live(entry, -1)
            self._unfinish(entry)
            self._order_dirty = True

    def _count_live(self, entry: _Entry, delta: int) -> None:
        if entry.state in p.FINAL_STATES:
            return
        key = (entry.kind, entry.state)
        count = self._live_counts.get(key, 0) + delta
        if count:
            self._live_counts[key] = count
        else:
            del self._live_counts[key]

    def _unfinish(self, entry: _Entry) -> None:
        if entry.state in p.FINAL_STATES:
            at = bisect.bisect_left(self._finished, entry.finished_ts)
            if at < len(self._finished) and self._finished[at] == entry.finished_ts:
                del self._finished[at]

    def _drop_removed_from_order(self) -> None:
        """Forget removed ids in the submission order."""
        if self._order_dirty:
            kept = [(ns, i) for ns, i in zip(self._order_ns, self._order_ids, strict=True)
                    if i in self._entries]
            self._order_ns = array("q", (ns for ns, _ in kept))
            self._order_ids = [i for _, i in kept]
            self._order_dirty = False

    def _remember(self, job_id: str, data: dict[str, Any]) -> None:
        self._recent[job_id] = data
        self._recent.move_to_end(job_id)
        while len(self._recent) > self._recent_kept:
            self._recent.popitem(last=False)

    def _data(self, job_id: str, entry: _Entry) -> dict[str, Any] | None:
        if entry.live is not None:
            return entry.live.data
        data = self._recent.get(job_id)
        if data is not None:
            self._recent.move_to_end(job_id)
            return data
        data = read_job(job_id, p.job_path(self.dir, job_id))
        if data is not None:
            self._remember(job_id, data)
        return data

    def _newest(self, state: str | None, kind: str | None, limit: int,
                before: str | None = None) -> list[dict[str, Any]]:
        """Up to `limit` jobs, newest first (older than `before`, if given)."""
        self._recent_kept = max(self._recent_kept, limit)
        self._drop_removed_from_order()
        end = len(self._order_ids)
        if before is not None:
            if before not in self._entries:
                raise UnknownCursor(f"no job {before[:64]!r} to list from: it was pruned, "
                                    "or is no job of this server; list again without `before`")
            end = self._order_ids.index(before)
        positions = self._queue_positions()
        selected: list[dict[str, Any]] = []
        for job_id in reversed(self._order_ids[:end]):
            if len(selected) >= limit:
                break
            entry = self._entries[job_id]
            if (state is not None and entry.state != state) or (kind is not None
                                                                and entry.kind != kind):
                continue
            data = self._data(job_id, entry)
            if data is None:
                continue
            selected.append(dict(data, **{p.F_QUEUE_POSITION: positions.get(job_id)}))
        return selected

    def _queue_positions(self) -> dict[str, int]:
        counted_at, counted = self._positions
        if counted_at is not None and counted_at == self._refreshed_at:
            return counted
        # The supervisor's order: due jobs by priority, then submission; then the jobs
        # not due yet, soonest first. One waiting for another job has none, nor one its
        # kind's cap holds back (beyond the room its kind has now).
        now = time.time()
        queued = sorted((_launch_order(live.data, now), str(live.data.get(p.F_KIND)))
                        for i in self._watched
                        if (live := self._entries[i].live) is not None
                        and self._entries[i].state == p.JobState.QUEUED
                        and not self._waits_for_another(live.data))
        room = {kind: cap - self._live_counts.get((kind, p.JobState.RUNNING.value), 0)
                for kind, cap in self._kind_caps_now().items()}
        positions: dict[str, int] = {}
        for order, kind in queued:
            if kind in room:
                if room[kind] <= 0:
                    continue
                room[kind] -= 1
            positions[order[-1]] = len(positions)
        self._positions = (self._refreshed_at, positions)
        return positions

    def _kind_caps_now(self) -> dict[str, int]:
        try:
            _, set_now = control.queue_caps(self.dir.parent)
        except OSError:  # out of file handles, say: the settings' caps meanwhile
            set_now = {}
        return {**self.kind_caps, **set_now}


    def _waits_for_another(self, job: dict[str, Any]) -> bool:
        """Whether a job the supervisor holds it back for has not ended: one its
        `depends_on` names, or the chat's earlier turn its `after` names."""
        return any((entry := self._entries.get(each)) is not None
                   and entry.state in (p.JobState.QUEUED, p.JobState.RUNNING)
                   for each in _awaited(job))


def _awaited(job: dict[str, Any]) -> list[str]:
    """The jobs `job` may wait for: those its `depends_on` names, and the chat's earlier
    turn its `after` names."""
    after = job.get(p.F_AFTER)
    return [*p.dependencies(job), *([after] if isinstance(after, str) else [])]


def _launch_order(job: dict[str, Any], now: float) -> tuple[float, int, int, str]:
    start_at = p.run_at(job)
    return (0.0 if start_at is None or start_at <= now else start_at, *p.queue_key(job))


def _stat(path: str) -> os.stat_result:
    """The job file's stat; of the link itself where the link leads nowhere it can end
    (a loop): such a file reads as damaged, and listing goes on."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno not in p.NO_FILE_TO_READ:
            raise
        return os.lstat(path)


def read_job(job_id: str, path: str | Path) -> dict[str, Any] | None:
    """A job file's data, None if there is none; a damaged one, or JSON that is not a
    job, reads as a failed job that says so (a listing must never fail on one file)."""
    try:
        data = p.read_json(path)
    except p.CorruptJobFile as exc:
        return corrupt_job(job_id, Path(path), str(exc))
    except OSError as exc:
        if exc.errno not in p.NO_FILE_TO_READ:
            raise
        return corrupt_job(job_id, Path(path), f"{p.JOB_FILE}: {exc.strerror}")
    if data is None:
        return None
    problem = not_a_job(job_id, data)
    if problem is not None:
        return corrupt_job(job_id, Path(path), f"{p.JOB_FILE}: not a valid job: {problem}")
    return data


def not_a_job(job_id: str, data: dict[str, Any]) -> str | None:
    """What makes `data` no job the API can show (its model), or None; every job file
    read is checked once (reads are cached), a few microseconds each."""
    if data.get(p.F_ID) != job_id:
        return f"its id is {str(data.get(p.F_ID))[:40]!r}, not its folder's"
    # What runners wrote (their result, say); its input was checked at its submission, and
    # may be large: a walk over it cost a read of a 1 MB input 10 ms.
    problem = p.json_problem({k: v for k, v in data.items() if k != p.F_INPUT},
                             p.MAX_DEPTH + 1, depth_only=True)
    if problem is not None:
        return problem
    try:
        Job.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "job"
        return f"{where}: {error['msg']}"
    return None


def corrupt_job(job_id: str, path: Path, detail: str) -> dict[str, Any]:
    try:
        created_at = p.iso(path.stat().st_mtime)
    except OSError:
        created_at = p.now_iso()
    data = p.new_job(job_id, "unknown", {}, 0)
    data.update({
        p.F_STATE: p.JobState.FAILED, p.F_CREATED_AT: created_at, p.F_FINISHED_AT: created_at,
        p.F_ERROR: {"type": p.ErrorType.CORRUPT,
                    "message": f"the job file is damaged and cannot be read ({detail})"},
    })
    return data
