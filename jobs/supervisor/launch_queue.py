"""The supervisor's queue: the queued jobs it knows, in launch order (`p.queue_key`),
those not due yet, and the caps a launch must stay under (on all runners, and by kind).

It holds what a job's order and caps need, not its file: launching one job costs a pop
off a heap, not a pass over all of them. It reads no job file and starts nothing; the
supervisor (`jobs.supervisor.loop`) decides what to queue and what to launch.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from jobs import protocol as p
from jobs.protocol import embedded
from jobs.protocol.control import QUEUE_CAP_FILE, queue_caps
from jobs.store.reading import Signature, stat_signature


class Queued(NamedTuple):
    """A queued job as the supervisor keeps it: enough to order and cap it unread."""

    key: p.QueueKey
    kind: str

    @classmethod
    def of(cls, data: dict[str, Any]) -> Queued:
        return cls(p.queue_key(data), str(data.get(p.F_KIND)))


class CapsSet(NamedTuple):
    """The caps set while running (the file `queue.cap`), as last read: on all, and by
    kind."""

    signature: Signature | None  # of the file as read; None: no file
    overall: int | None
    kinds: dict[str, int]


class LaunchQueue:
    """The queued jobs by launch order and time, and the runners counted against the
    caps by kind (the supervisor says when one starts and when it is gone)."""

    def __init__(self, data_dir: Path, max_concurrent: int, kind_caps: dict[str, int],
                 model_slots: int | None = None) -> None:
        self._data_dir = data_dir
        self._cap_file = data_dir / QUEUE_CAP_FILE
        self.max_concurrent = max_concurrent  # OFFLOAD_MAX_CONCURRENT; see runner_cap()
        self.kind_caps = kind_caps  # OFFLOAD_KIND_CAPS
        self.model_slots = model_slots  # chats at once on the embedded model (Settings)
        self._caps_set = CapsSet(None, None, {})
        self._entries: dict[str, Queued] = {}  # every queued job the supervisor knows
        # The due jobs in launch order; entries no longer in _entries (or there with
        # another key) are skipped when popped.
        self._order: list[tuple[p.QueueKey, str]] = []
        # The jobs not due yet (run_at, or a retry's backoff), soonest first: each goes
        # onto _order when due, and the supervisor wakes for the first.
        self._timers: list[tuple[float, p.QueueKey, str]] = []
        # A job whose kind is at its cap waits here, off _order (so it holds up no other
        # kind), until its kind has room (see release_set_aside).
        self._set_aside: dict[str, list[tuple[p.QueueKey, str]]] = {}
        self._running_kind: dict[str, str] = {}  # running job id -> its kind
        self._running_by_kind: Counter[str] = Counter()

    # -- what is queued --------------------------------------------------------------

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def ids(self) -> set[str]:
        return set(self._entries)

    def key_of(self, job_id: str) -> p.QueueKey | None:
        entry = self._entries.get(job_id)
        return None if entry is None else entry.key

    def add(self, job_id: str, data: dict[str, Any]) -> None:
        """Queue a job: in launch order if due, else until its `run_at`."""
        at = p.run_at(data)
        if at is not None and at > time.time():
            self.add_later(job_id, data, at)
        else:
            entry = self._entries[job_id] = Queued.of(data)
            heapq.heappush(self._order, (entry.key, job_id))

    def add_later(self, job_id: str, data: dict[str, Any], at: float) -> None:
        """Queue a job that waits until `at` (time.time()): back in order no sooner than
        the next pass, even if `at` has passed meanwhile."""
        entry = self._entries[job_id] = Queued.of(data)
        heapq.heappush(self._timers, (at, entry.key, job_id))

    def hold(self, job_id: str, data: dict[str, Any]) -> None:
        """Keep a job queued, off the launch order: it waits for another job to end, and
        `back_in_order` puts it back."""
        self._entries[job_id] = Queued.of(data)

    def back_in_order(self, job_id: str) -> None:
        entry = self._entries.get(job_id)
        if entry is not None:  # else cancelled or deleted meanwhile
            heapq.heappush(self._order, (entry.key, job_id))

    def discard(self, job_id: str) -> bool:
        """Forget a queued job (ended, deleted, cancelled); whether it was queued."""
        return self._entries.pop(job_id, None) is not None

    def next_due_at(self) -> float | None:
        """When the first job waiting for its time is due (time.time()); None: none waits."""
        return self._timers[0][0] if self._timers else None

    # -- taking the next job -----------------------------------------------------------

    def release_due(self) -> None:
        """The jobs whose time has come join the launch order."""
        now = time.time()
        while self._timers and self._timers[0][0] <= now:
            _, key, job_id = heapq.heappop(self._timers)
            entry = self._entries.get(job_id)
            if entry is not None and entry.key == key:
                heapq.heappush(self._order, (key, job_id))

    def pop_next(self) -> str | None:
        """The first due job in launch order whose kind is under its cap, taken off the
        queue; those of a kind at its cap are set aside on the way."""
        while self._order:
            key, job_id = heapq.heappop(self._order)
            entry = self._entries.get(job_id)
            if entry is None or entry.key != key:
                continue
            cap = self.kind_cap(entry.kind)
            if cap is not None and self._running_by_kind[entry.kind] >= cap:
                heapq.heappush(self._set_aside.setdefault(entry.kind, []), (key, job_id))
                continue
            del self._entries[job_id]
            return job_id
        return None

    def release_set_aside(self) -> None:
        """Of each kind below its cap, as many set-aside jobs as it has room for go back
        in launch order. Every pass, not once per ended runner: a job sent back may never
        start (cancelled, waiting for its turn), and must not hold up the others."""
        for kind in list(self._set_aside):
            waiting = self._set_aside[kind]
            cap = self.kind_cap(kind)  # none now: set aside under a cap since lifted
            room = len(waiting) if cap is None else cap - self._running_by_kind[kind]
            while waiting and room > 0:
                key, waiter = heapq.heappop(waiting)
                entry = self._entries.get(waiter)
                if entry is not None and entry.key == key:
                    heapq.heappush(self._order, (key, waiter))
                    room -= 1
            if not waiting:
                del self._set_aside[kind]

    # -- the runners against the caps -------------------------------------------------

    def runner_started(self, job_id: str, kind: str) -> None:
        self._running_kind[job_id] = kind
        self._running_by_kind[kind] += 1

    def runner_gone(self, job_id: str) -> None:
        kind = self._running_kind.pop(job_id, None)
        if kind is not None:
            self._running_by_kind[kind] -= 1

    def runner_cap(self) -> int:
        """Runners alive at once: as set while the server runs (`PUT /api/queue/cap`),
        else OFFLOAD_MAX_CONCURRENT. The file is read again only once it has changed (the
        caps by kind with it: see `kind_cap`)."""
        try:
            signature: Signature | None = stat_signature(os.stat(self._cap_file))
        except OSError:
            signature = None
        if signature != self._caps_set.signature:
            try:
                self._caps_set = CapsSet(signature, *(queue_caps(self._data_dir) if signature
                                                      else (None, {})))
            except OSError:  # out of file handles, say: read again at the next pass
                pass
        return self._caps_set.overall or self.max_concurrent

    def kind_cap(self, kind: str) -> int | None:
        """Runners of `kind` alive at once: as set while running, else OFFLOAD_KIND_CAPS's
        (None: no cap of its own), as `runner_cap` last read them; chats no more than the
        embedded model's slots."""
        return embedded.kind_cap(kind, self._caps_set.kinds.get(kind, self.kind_caps.get(kind)),
                                 self.model_slots)
