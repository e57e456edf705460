"""The jobs in the order they were submitted, for listings newest first and pruning
oldest first, kept sorted as jobs come so that no listing sorts them."""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Container


class SubmissionOrder:
    """Ids and their creation times, ascending; removed ids linger until the next
    `ids()` (or `add`) drops them, so a removal costs nothing."""

    def __init__(self, kept: Container[str]) -> None:
        self._kept = kept  # the ids that are still jobs (the index's entries)
        self._ns = array("q")
        self._ids: list[str] = []
        self._dirty = False

    def add(self, job_id: str, created_ns: int) -> None:
        self.ids()  # a dropped id that comes back must not be listed twice
        at = bisect.bisect_right(self._ns, created_ns)
        self._ns.insert(at, created_ns)
        self._ids.insert(at, job_id)

    def removed(self) -> None:
        """A job was removed: its id goes at the next `ids()`."""
        self._dirty = True

    def ids(self) -> list[str]:
        """The ids of the jobs kept, oldest first (the list itself: do not change it)."""
        if self._dirty:
            kept = [(ns, i) for ns, i in zip(self._ns, self._ids, strict=True)
                    if i in self._kept]
            self._ns = array("q", (ns for ns, _ in kept))
            self._ids = [i for _, i in kept]
            self._dirty = False
        return self._ids
