"""The job counters the leading supervisor keeps for /metrics, and their file.

A leader goes on from the counts the last one saved. Until that file can be read it
counts from zero and saves nothing (which would lose the file's counts), then adds the
two up; the jobs it found final meanwhile are looked at again then, so that none is
counted twice or missed. A file deleted or replaced under it (by hand: to start from
zero, or from a copy) is read again, and what it counted since its last save added.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.protocol.counters import SAVE_EVERY_S, JobCounters, counters_file, removed_notes

log = logging.getLogger(__name__)


class Counting:
    """The leader's counters: counted as jobs start, retry and end; saved now and then."""

    def __init__(self, data_dir: Path, job_file: Callable[[str], Path]) -> None:
        self._data_dir = data_dir
        self._file = counters_file(data_dir)
        self._job_file = job_file
        self.counters = JobCounters()  # read from its file once this supervisor leads
        self._since_save = JobCounters()  # what it counted since its last save
        self._wrote: tuple[int, int] | None = None  # the file as its last save left it
        self._read = False
        self._unread = False  # said so in the log
        self._unsure_final: list[str] = []  # final jobs found before the file was read
        self._removed: list[dict[str, Any]] = []  # notes of removed jobs, at a takeover
        self._unsaved = False  # the last save failed (said once)
        self._saved = 0.0

    def take_over(self) -> None:
        """This supervisor leads now: on from the counts as the last leader left them."""
        self.counters, self._since_save, self._wrote = JobCounters(), JobCounters(), None
        self._read, self._unsure_final = False, []
        # Jobs removed as their runners ended while no leader watched: counted below, if
        # the last leader did not.
        self._removed = removed_notes(self._data_dir)
        self._read_file()

    def started(self, data: dict[str, Any]) -> None:
        now = time.time()
        for counters in (self.counters, self._since_save):
            counters.started(data, now)

    def retried(self, data: dict[str, Any], error_type: str) -> None:
        for counters in (self.counters, self._since_save):
            counters.retried(data, error_type)

    def ended(self, data: dict[str, Any]) -> None:
        """A job whose final state this supervisor wrote or saw written."""
        for counters in (self.counters, self._since_save):
            counters.ended(data)

    def found_final(self, job_id: str, data: dict[str, Any]) -> None:
        """A job found final on disk when this supervisor first looked at it (at its start,
        or once it took over): counted if no leader counted it."""
        if not self._read:
            self._unsure_final.append(job_id)  # counted or not, the file will say
        elif self.counters.missed(data):
            self.ended(data)

    def save(self, running: Iterable[str], force: bool = False) -> None:
        """To the file, with the jobs running now, at most every SAVE_EVERY_S."""
        now = time.monotonic()
        if not self.counters.dirty or (not force and now < self._saved + SAVE_EVERY_S):
            return
        self._saved = now
        if not self._read_file() or not self._still_as_written():
            return
        try:
            self.counters.save(self._file, time.time(), running)
            self._since_save, self._wrote = JobCounters(), self._identity()
        except OSError as exc:  # kept in memory: saved with the next pass that can
            if not self._unsaved:  # once, not every SAVE_EVERY_S (a full disk)
                log.warning("cannot save the job counters (kept, saved once it can): %s", exc)
            self._unsaved = True
        else:
            if self._unsaved:
                log.info("the job counters are saved again")
            self._unsaved = False

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._file)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _still_as_written(self) -> bool:
        """Whether the file is as this leader's last save left it; if not, its counts are
        read from it again (none, if it was deleted), what was counted since added."""
        if self._wrote is None or self._identity() == self._wrote:
            return True
        try:
            saved = JobCounters.load(self._file)
        except OSError as exc:  # as at the start: counted on, saved once it can be read
            if not self._unread:
                log.warning("cannot read the job counters again (%s); counting on", exc)
            self._unread = True
            return False
        self._unread = False
        log.info("the job counters file was changed or removed by another hand: going on "
                 "from what it holds now")
        saved.add(self._since_save)
        self.counters, self._wrote = saved, None
        return True

    def _read_file(self) -> bool:
        if self._read:
            return True
        try:
            saved = JobCounters.load(self._file)
        except OSError as exc:
            if not self._unread:
                log.warning("cannot read the job counters yet (%s); counting on", exc)
            self._unread = True
            return False
        self._unread = False
        for job_id in self._unsure_final:  # found final while the file could not be read
            data = p.read_json_or_none(self._job_file(job_id))
            if data is not None and data.get(p.F_STATE) in p.FINAL_STATES and saved.missed(data):
                saved.ended(data)
        for note in self._removed:
            if note.get(p.F_STATE) in p.FINAL_STATES and saved.missed(note):
                saved.ended(note)
        self._unsure_final, self._removed = [], []
        saved.add(self.counters)
        self.counters, self._read = saved, True
        return True
