"""What the store raises when the data folder cannot be used: the API answers it with a
503 (507 for a full disk) that says what did not happen, and its health says why."""

from __future__ import annotations

from jobs import protocol as p


class StoreUnavailable(Exception):
    """The data folder cannot be written or read (disk full, read-only, permissions, a
    file where a folder goes); `outcome`: what did not happen, for the answer."""

    def __init__(self, message: str, outcome: str = "The job was not stored",
                 retry: bool = True, no_room: bool = False, standing: bool = False) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retry = retry  # False: what was asked goes ahead, to ask again changes nothing
        self._no_room = no_room
        # True: a problem /api/health looks for and says by itself while it lasts
        self.standing = standing

    @property
    def disk_full(self) -> bool:
        """Whether it failed for room on the data folder's disk (raised from that OSError)."""
        return self._no_room or (isinstance(self.__cause__, OSError)
                                 and self.__cause__.errno in p.DISK_FULL)
