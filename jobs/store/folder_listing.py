"""Which job folders there are, listed again only when the folder may have changed."""

from __future__ import annotations

import os
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

from jobs import protocol as p
from jobs.store.errors import StoreUnavailable

DIR_SETTLE_S = 0.1  # a folder listing is trusted once the folder's mtime is this old
RELIST_S = 10.0  # and listed again at least this often anyway


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
            now = time.monotonic()
            if (self._stable and st.st_mtime_ns == self._mtime_ns
                    and now - self._listed_at < RELIST_S):
                return None
            listed = set(os.listdir(self.folder))
        except OSError as exc:  # none yet, a file in its way, or no permission to read it
            misplaced = p.files.file_in_the_way(self.folder)
            if isinstance(exc, FileNotFoundError) and misplaced is None:  # made with a job
                self._mtime_ns, self._stable = None, False
                return set()
            # Looked at, not told by the error: Windows says "not found" where Linux says
            # "not a directory".
            what_to_do = ("make it readable by this user" if misplaced is None
                          else "move away the file in its place" if misplaced == self.folder
                          else f"move away the file in place of the folder {misplaced}")
            raise StoreUnavailable(f"cannot list the jobs in {self.folder} "
                                   f"({exc.strerror or exc}): {what_to_do}",
                                   "Nothing was read or stored") from exc
        names = (listed & known) | {name for name in listed - known if p.is_valid_id(name)}
        self._mtime_ns = st.st_mtime_ns
        self._stable = time.time() - st.st_mtime > DIR_SETTLE_S
        self._listed_at = now
        return names
