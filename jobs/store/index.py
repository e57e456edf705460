"""The in-memory index over the job folder: what listing, counting and pruning need.

It keeps a few fields of every job and the whole job only for live ones and the most
recently read finished ones, so memory stays flat at any number of jobs. A refresh
lists the folder only when it changed and reads only the files of live jobs that
changed: finished job files are never rewritten. What it keeps of each job, its counts,
the submission order, the chats and the queue positions live in modules of their own.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.store.chats import SessionTurns, TokenTotals
from jobs.store.entries import Entry, Live, Load as Load, SubmissionOrder, Tallies
from jobs.store.folder_listing import RELIST_S, DirListing
from jobs.store.queue_positions import (
    Count,
    awaited,
    count_positions,
    kind_caps_now,
    waiting_for_jobs,
)
from jobs.store.reading import read_job, stat_job_file, stat_signature

SETTLE_S = 5.0  # a finished job file this long unchanged is never looked at again
RECENT_KEPT = 256  # finished jobs kept whole in memory, most recently read, at least
SNAPSHOT_JOBS = 50  # newest jobs in the snapshot that `refresh` leaves for the event loop
# A refresh looks at every live job's file but the queued ones past the first NEXT_IN_LINE
# (and those waiting for another job): each of those once QUEUED_LOOK_S has passed since
# its last look: a stat of each, every refresh, cost the API worker almost half a CPU with
# 5,000 queued (docs/benchmarks.md). So are the damaged files, watched for a mend.
NEXT_IN_LINE = 64
QUEUED_LOOK_S = 1.0


class UnknownCursor(ValueError):
    """A listing's `before` names no job the index holds."""


class JobIndex:
    """Jobs newest first, counts by state, queue positions, sessions, what to prune;
    safe to use from several threads."""

    def __init__(self, jobs_dir: Path, kind_caps: dict[str, int] | None = None,
                 model_slots: int | None = None) -> None:
        self.dir = jobs_dir
        # OFFLOAD_KIND_CAPS (those set while running, in `queue.cap`, go over them): a job
        # its kind's cap holds back has no place in the queue, as the supervisor sets it aside.
        self.kind_caps = dict(kind_caps or {})
        self.model_slots = model_slots  # and a chat the embedded model's slots hold back
        self._lock = threading.Lock()  # routes use the store from several worker threads
        self._listing = DirListing(jobs_dir)
        self._entries: dict[str, Entry] = {}
        self._order = SubmissionOrder(self._entries)
        self._tallies = Tallies()
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
        # The queue's positions and why each queued job waits, counted again only once a
        # job or a cap has changed (`_changes`, `_caps`), or a job has come due (the
        # count's `next_due`); the key is None when they are to be counted again, and the
        # last count stays for `_refresh`.
        self._positions: tuple[tuple[int, tuple[tuple[str, int], ...]] | None,
                               Count] = (None, Count({}, {}, math.inf))
        self._changes = 0  # jobs put or dropped so far
        self._caps: dict[str, int] = dict(self.kind_caps)  # as of the last refresh
        self._usage = TokenTotals()
        self._turns = SessionTurns()

    # -- queries -------------------------------------------------------------------

    def list_jobs(self, states: Collection[str] = (), kinds: Collection[str] = (),
                  limit: int = 100, max_age_s: float = 0.0,
                  before: str | None = None) -> list[dict[str, Any]]:
        """Newest first (in any of `states`, of any of `kinds`; none given: all), with
        queue positions filled in for queued jobs; with `before`, those submitted before
        that job (the next page of a listing)."""
        with self._lock:
            self._refresh(max_age_s)
            return self._newest(states, kinds, limit, before)

    def counts(self, max_age_s: float = 0.0) -> dict[str, int]:
        with self._lock:
            self._refresh(max_age_s)
            return dict(self._tallies.by_state)

    def live_counts(self, max_age_s: float = 0.0) -> dict[tuple[str, str], int]:
        """The queued and running jobs by kind and state."""
        with self._lock:
            self._refresh(max_age_s)
            return dict(self._tallies.live)

    def overview(self, limit: int, max_age_s: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The newest jobs and the counts by state."""
        with self._lock:
            self._refresh(max_age_s)
            return self._newest((), (), limit), dict(self._tallies.by_state)

    def load(self, max_age_s: float = 0.0) -> Load:
        with self._lock:
            self._refresh(max_age_s)
            return self._tallies.load()

    def refresh(self) -> None:
        """Bring the index up to date, and keep a snapshot of the newest jobs and the
        load that `cached_overview` and `cached_load` answer from without the lock."""
        with self._lock:
            self._refresh(0.0)
            with self._unlisted_lock:
                self._unlisted = {job_id: at for job_id, at in self._unlisted.items()
                                  if job_id not in self._entries}  # else listed now
            jobs = self._newest((), (), SNAPSHOT_JOBS)
            load = self._tallies.load()
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

    def queue_place(self, job_id: str, max_age_s: float = 0.0
                    ) -> tuple[int | None, dict[str, Any] | None]:
        """Its place in the queue and why it waits (`waits_for`), counted at most
        `max_age_s` ago (a job queued since is counted now)."""
        with self._lock:
            self._refresh(max_age_s)
            count = self._queue_positions()
            if job_id not in count.waits and max_age_s > 0:
                if job_id in self._entries:
                    self._refresh(0.0)
                else:  # queued since the last look: read alone, not with every live job
                    self._load(job_id)
                    entry = self._entries.get(job_id)
                    if entry is not None and entry.live is not None and any(
                            other not in self._entries for other in awaited(entry.live.data)):
                        self._refresh(0.0)  # and a job it waits for, as new
                count = self._queue_positions()
            return count.positions.get(job_id), count.waits.get(job_id)

    def cached_queue_place(self, job_id: str, max_age_s: float
                           ) -> tuple[int | None, dict[str, Any] | None] | None:
        """`queue_place` from the last `refresh` if it is recent enough and counted the
        job, else None; like `cached_load`, for the event loop."""
        snapshot, (counted_for, count) = self._snapshot, self._positions
        if (snapshot is None or time.monotonic() - snapshot[0] > max_age_s
                or counted_for is None or job_id not in count.waits):
            return None
        return count.positions.get(job_id), count.waits[job_id]

    def session_jobs(self, session_id: str) -> list[dict[str, Any]]:
        """A chat session's jobs, oldest first."""
        with self._lock:
            self._refresh(0.0)
            found = [i for i in self._order.ids() if self._entries[i].session == session_id]
            jobs = (self._data(i, self._entries[i]) for i in found)
            return [job for job in jobs if job is not None]

    def session_turn(self, session_id: str) -> tuple[str | None, list[str]]:
        """A chat session's newest job and its queued or running ones, counted now."""
        with self._lock:
            self._refresh_session(session_id)
            return self._turns.newest(session_id), sorted(self._turns.live(session_id))

    def needing(self, job_id: str) -> list[str]:
        """The live jobs that need `job_id`, counted now, oldest first: those that depend
        on it (a running one may be queued again for another attempt) and, for a chat's
        turn, the turns of its conversation not ended (the earlier ones are their context)."""
        with self._lock:
            self._refresh(0.0)
            entry = self._entries.get(job_id)
            session = entry.session if entry is not None else None

            def needs(i: str) -> bool:
                other = self._entries[i]
                return (other.live is not None
                        and other.state in (p.JobState.QUEUED, p.JobState.RUNNING)
                        and (job_id in p.dependencies(other.live.data)
                             or (session is not None and other.session == session)))

            # Looked at again now: one queued far back was last looked at up to
            # QUEUED_LOOK_S ago (cancelled since, it needs nothing).
            self._look_at([i for i in self._watched if needs(i)])
            needing = sorted(p.fifo_key(live.data) for i in self._watched
                             if needs(i) and (live := self._entries[i].live) is not None)
            return [each for _, each in needing if each != job_id]

    def _depended_on(self) -> set[str]:
        """The jobs that the live (queued or running) ones depend on."""
        needed: set[str] = set()
        for i in self._watched:
            entry = self._entries.get(i)
            if (entry is not None and entry.live is not None
                    and entry.state in (p.JobState.QUEUED, p.JobState.RUNNING)):
                needed.update(p.dependencies(entry.live.data))
        return needed

    def look_at(self, job_ids: list[str]) -> None:
        """These jobs brought up to date now, whenever they were last looked at: a caller
        that has just seen them change (a cancel that waited for their final states)."""
        with self._lock:
            self._look_at(job_ids)

    def prunable(self, cutoff: float, max_jobs: int | None,
                 young: float = math.inf, keep: frozenset[str] | set[str] = frozenset()
                 ) -> set[str]:
        """Finished jobs that finished before `cutoff`, then the oldest finished ones
        beyond `max_jobs` jobs in all; never one that finished at `young` or later, nor
        one in `keep` (the next oldest goes in its place)."""
        with self._lock:
            self._refresh(0.0)
            # And those a live job depends on, as this refresh found them: one stored a
            # moment ago may not be in the supervisor's queue yet (its `keep`).
            keep = set(keep) | self._depended_on()
            finished = [i for i in self._order.ids() if self._entries[i].state in p.FINAL_STATES
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
        return self._usage.totals()

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._drop(job_id)
            self._usage.forget(job_id)

    # -- the index -----------------------------------------------------------------

    def _refresh(self, max_age_s: float) -> None:
        now = time.monotonic()
        if self._refreshed_at is not None and now - self._refreshed_at <= max_age_s:
            return
        self._take_listing()
        self._caps = kind_caps_now(self.dir, self.kind_caps)
        wall, looked_before = time.time(), now - QUEUED_LOOK_S
        next_in_line = self._positions[1].positions
        for job_id in list(self._watched):
            entry, live = self._entries[job_id], self._entries[job_id].live
            if live is not None and live.looked_at > looked_before and (
                    (entry.state == p.JobState.QUEUED
                     and next_in_line.get(job_id, NEXT_IN_LINE) >= NEXT_IN_LINE)
                    or (entry.state == p.JobState.FAILED and p.holds_no_job(live.data))):
                continue
            self._check(job_id, wall)
        self._refreshed_at = now

    def _refresh_session(self, session_id: str) -> None:
        """`_refresh(0.0)` for one chat session's turns: the jobs added and removed, and
        the session's queued and running ones looked at again, not every live job."""
        self._take_listing()
        wall = time.time()
        for job_id in list(self._turns.live(session_id)):
            if job_id in self._watched:
                self._check(job_id, wall)

    def _take_listing(self) -> None:
        """The jobs added to the folder and removed from it since the last listing."""
        names = self._listing.changed(self._entries.keys() | self._missing)
        if names is not None:
            for gone in (self._entries.keys() | self._missing) - names:
                self._drop(gone)
                self._usage.forget(gone)  # its folder is gone: never seen again
            self._missing |= names - self._entries.keys()
        for job_id in list(self._missing):
            self._load(job_id)

    def _load(self, job_id: str) -> None:
        path = p.job_path(self.dir, job_id)
        try:
            st = stat_job_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        data = read_job(job_id, path)
        if data is None:
            return
        self._missing.discard(job_id)
        self._put(job_id, data, Live(st, data))

    def _check(self, job_id: str, wall: float) -> None:
        live = self._entries[job_id].live
        assert live is not None
        path = p.job_path(self.dir, job_id)
        try:
            st = stat_job_file(path)
        except (FileNotFoundError, NotADirectoryError):
            self._drop(job_id)
            self._missing.add(job_id)
            return
        live.looked_at = time.monotonic()
        if stat_signature(st) != live.signature:
            self._load(job_id)
        elif self._settled(job_id, live.data, st.st_mtime_ns, wall):
            self._remember(job_id, live.data)
            self._stop_watching(job_id)

    def _look_at(self, job_ids: list[str]) -> None:
        wall = time.time()
        for job_id in job_ids:
            if job_id in self._watched:
                self._check(job_id, wall)

    def _stop_watching(self, job_id: str) -> None:
        """Finished and quiet: never looked at again, and kept small (the whole job is
        read again on demand)."""
        self._watched.discard(job_id)
        self._entries[job_id].live = None

    def _put(self, job_id: str, data: dict[str, Any], live: Live) -> None:
        entry = Entry(data, live)
        old = self._entries.get(job_id)
        if old is not None:
            self._tallies.remove(old)
        else:
            self._order.add(job_id, p.fifo_key(data)[0])
        self._entries[job_id] = entry
        self._tallies.add(entry)
        self._changes += 1
        self._watched.add(job_id)
        if entry.session is not None:
            self._turns.track(job_id, entry, p.fifo_key(data))
        self._usage.seen(job_id, entry, data)
        if self._settled(job_id, data, live.mtime_ns, time.time()):
            self._stop_watching(job_id)

    def _settled(self, job_id: str, data: dict[str, Any], mtime_ns: int, wall: float) -> bool:
        """Finished, its file quiet for SETTLE_S, and a job: a damaged file stays watched,
        so that one mended by hand is listed as it is again."""
        return (self._entries[job_id].state in p.FINAL_STATES
                and wall - mtime_ns / 1e9 > SETTLE_S and not p.holds_no_job(data))

    def _drop(self, job_id: str) -> None:
        self._missing.discard(job_id)
        self._watched.discard(job_id)
        self._recent.pop(job_id, None)
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            self._changes += 1
            self._turns.untrack(job_id, entry)
            self._tallies.remove(entry)
            self._order.removed()

    def _remember(self, job_id: str, data: dict[str, Any]) -> None:
        self._recent[job_id] = data
        self._recent.move_to_end(job_id)
        while len(self._recent) > self._recent_kept:
            self._recent.popitem(last=False)

    def _data(self, job_id: str, entry: Entry) -> dict[str, Any] | None:
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

    def _newest(self, states: Collection[str], kinds: Collection[str], limit: int,
                before: str | None = None) -> list[dict[str, Any]]:
        """Up to `limit` jobs, newest first (older than `before`, if given)."""
        self._recent_kept = max(self._recent_kept, limit)
        order = self._order.ids()
        end = len(order)
        if before is not None:
            if not p.is_valid_id(before):  # a typo, not a job pruned since
                raise UnknownCursor(f"{before[:64]!r} is no job's id (32 lowercase hex "
                                    "characters): give `before` a listing's `next_before`")
            if before not in self._entries:
                raise UnknownCursor(f"no job {before[:64]!r} to list from: it was pruned, "
                                    "or is no job of this server; list again without `before`")
            end = order.index(before)
        count = self._queue_positions()
        selected: list[dict[str, Any]] = []
        for job_id in reversed(order[:end]):
            if len(selected) >= limit:
                break
            entry = self._entries[job_id]
            if (states and entry.state not in states) or (kinds and entry.kind not in kinds):
                continue
            data = self._data(job_id, entry)
            if data is None:
                continue
            selected.append(dict(data, **{p.F_QUEUE_POSITION: count.positions.get(job_id),
                                          p.F_WAITS_FOR: count.waits.get(job_id)}))
        return selected

    def _queue_positions(self) -> Count:
        key = (self._changes, tuple(sorted(self._caps.items())))
        counted_for, counted = self._positions
        if counted_for == key and time.time() < counted.next_due:
            return counted
        queued, held = [], {}
        for job_id in self._watched:
            live = self._entries[job_id].live
            if live is None or self._entries[job_id].state != p.JobState.QUEUED:
                continue
            waited = self._waited(live.data)
            if waited:
                held[job_id] = waiting_for_jobs(live.data, waited)
            else:
                queued.append(live.data)
        count = count_positions(queued, self._tallies.live, self._caps, self.model_slots)
        count.waits.update(held)
        self._positions = (key, count)
        return count

    def _waited(self, job: dict[str, Any]) -> list[str]:
        """The jobs the supervisor holds it back for that have not ended: those its
        `depends_on` names, and the chat's earlier turn its `after` names."""
        return [each for each in awaited(job)
                if (entry := self._entries.get(each)) is not None
                and entry.state in (p.JobState.QUEUED, p.JobState.RUNNING)]

