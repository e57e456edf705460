"""The index's counts, kept as jobs come, change and go, so that counting never walks
the jobs: by state, the live ones by kind, and when the finished ones finished."""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

from jobs import protocol as p
from jobs.store.entries import Entry


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


class Tallies:
    """Counts by state, the queued and running jobs by (kind, state), and the finish
    times of finished jobs, ascending."""

    def __init__(self) -> None:
        self.by_state: dict[str, int] = {state.value: 0 for state in p.JobState}
        self.live: dict[tuple[str, str], int] = {}  # (kind, state): queued, running
        self.finished = array("d")

    def add(self, entry: Entry) -> None:
        self.by_state[entry.state] = self.by_state.get(entry.state, 0) + 1
        self._count_live(entry, 1)
        if entry.state in p.FINAL_STATES:
            self.finished.insert(bisect.bisect(self.finished, entry.finished_ts),
                                 entry.finished_ts)

    def remove(self, entry: Entry) -> None:
        self.by_state[entry.state] = self.by_state.get(entry.state, 0) - 1
        self._count_live(entry, -1)
        if entry.state in p.FINAL_STATES:
            at = bisect.bisect_left(self.finished, entry.finished_ts)
            if at < len(self.finished) and self.finished[at] == entry.finished_ts:
                del self.finished[at]

    def load(self) -> Load:
        # Copying the finish times is a memcpy: about 20 microseconds at 20,000 jobs.
        return Load(dict(self.by_state), self.finished[:])

    def _count_live(self, entry: Entry, delta: int) -> None:
        if entry.state in p.FINAL_STATES:
            return
        key = (entry.kind, entry.state)
        count = self.live.get(key, 0) + delta
        if count:
            self.live[key] = count
        else:
            del self.live[key]
