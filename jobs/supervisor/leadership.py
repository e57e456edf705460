"""Which supervisor leads a data folder: whoever holds the OS file lock
`<data>/supervisor.lock`. The others try again now and then, so when the leader dies a
survivor takes over."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from filelock import FileLock, Timeout

from jobs import protocol as p
from jobs.protocol.wake import lock_file

log = logging.getLogger(__name__)


class Leadership:
    """This supervisor's hold on the lock: taken, checked, released."""

    def __init__(self, jobs_dir: Path) -> None:
        self._dir = jobs_dir
        # The mode said: filelock 3.x gives its files 0o644 whatever the umask.
        self._lock = FileLock(str(lock_file(jobs_dir)), thread_local=False, mode=0o600)
        self._said_waiting = False
        self.problem: str | None = None  # why it cannot even try (a file where a folder goes)

    @property
    def lock_file(self) -> str:
        return self._lock.lock_file

    def take(self) -> bool:
        """Lead if no other supervisor does; at once, never waiting."""
        problem = None
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"cannot make the jobs folder {self._dir}: {exc.strerror or exc}"
            misplaced = p.files.file_in_the_way(self._dir)
            if misplaced is not None:  # "File exists" alone sent one looking for a folder
                problem += f" (a file is in place of the folder {misplaced}: move it away)"
        else:
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                if not self._said_waiting:  # once: it looks at the lock every pass
                    self._said_waiting = True
                    log.info("another supervisor leads %s: this one waits to take over when "
                             "it leaves", self._dir)
            except OSError as exc:
                problem = f"cannot take the supervisor lock: {exc}"
            else:
                self.problem = None
                return True
        if problem is not None and problem != self.problem:  # once, not every second
            log.warning("%s", problem)
        self.problem = problem
        return False

    def still_here(self) -> bool:
        """Whether the lock held is still the file at its path: one removed (as a stale
        lock, by hand or by a cleaner of old files) or replaced lets another supervisor
        lead beside this one."""
        fd = getattr(getattr(self._lock, "_context", None), "lock_file_fd", None)
        if not isinstance(fd, int):
            return True  # another filelock's inside: cannot tell, as before
        try:
            held, there = os.fstat(fd), os.stat(self._lock.lock_file)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        self._lock.release()
