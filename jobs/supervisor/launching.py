"""Launching, a part of the Supervisor (`jobs.supervisor.loop`): each pass takes the queued
jobs in launch order while the caps leave room and the queue is not paused, and starts
each that may start now. One cancelled meanwhile ends; one that waits for another job is
set aside under it; one whose dependency did not complete fails; one whose claim cannot
be written stays queued.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs import protocol as p
from jobs.launch.base import CannotStartNow, ClaimedAlready, ClaimFailed, Launcher
from jobs.protocol.control import queue_paused
from jobs.settings import CLAIM_RETRY_S
from jobs.store.reading import Signature, not_a_job
from jobs.supervisor.counting import Counting
from jobs.supervisor.dependencies import Dependencies
from jobs.supervisor.launch_queue import LaunchQueue
from jobs.supervisor.lifecycle import JobLife
from jobs.supervisor.wakeups import Wakeups

log = logging.getLogger(__name__)


class Launching:
    """Mixed into the Supervisor: its state, set in loop.py, as used here."""

    dir: Path
    kinds: dict[str, str]
    launcher: Launcher
    _queue: LaunchQueue
    _running: dict[str, JobLife]
    _read_now: dict[str, dict[str, Any]]
    _waiting: dict[str, list[str]]
    _running_chat_by_session: dict[str, str]
    _unwritten: dict[str, JobLife]
    _dependencies: Dependencies
    _counting: Counting
    _wakeups: Wakeups
    _blocked: bool

    if TYPE_CHECKING:  # the Supervisor's other parts (loop.py, endings.py)
        def _file(self, job_id: str) -> Path: ...
        def _enqueue(self, job_id: str, data: dict[str, Any]) -> None: ...
        def _now_running(self, job_id: str, life: JobLife, data: dict[str, Any]) -> None: ...
        def _adopt(self, job_id: str, data: dict[str, Any]) -> None: ...
        def _settle(self, life: JobLife) -> None: ...
        def _end_unstarted(self, job_id: str, state: str, error_type: str,
                           message: str) -> None: ...
        def _cancel_unstarted(self, job_id: str) -> None: ...
        def _known_damaged(self, job_id: str, seen: Signature | None) -> None: ...
        def _unseen_live(self, job_id: str) -> bool: ...
        def _stop_asked(self, job_id: str) -> bool: ...

    def _launch(self) -> None:
        if queue_paused(self.dir.parent):
            return  # queued jobs wait; POST /api/queue/resume wakes this loop
        self._queue.release_set_aside()
        # The pause and the cap looked at before each launch: a burst of hundreds takes
        # seconds, and a pause or a lower cap meanwhile holds from the next launch on.
        while len(self._running) < self._queue.runner_cap():
            job_id = self._queue.pop_next()
            if job_id is None or not self._launch_one(job_id):
                break
            if queue_paused(self.dir.parent):
                break

    def _launch_one(self, job_id: str) -> bool:
        """Start one queued job if it may start now; False if the data folder cannot be
        written now (the job stays queued and launching waits for the next pass)."""
        data = self._prepare_start(job_id)
        return True if data is None else self._start(job_id, data)

    def _prepare_start(self, job_id: str) -> dict[str, Any] | None:
        """The queued job as its file says, if it may start now; else None, once what
        keeps it is dealt with: ended or edited since (nothing to do), cancelled (ended
        here), waiting for another job (set aside under it), or failed by a dependency."""
        job_file = self._file(job_id)
        # Read once per pass: a cancel since then left its stop file, looked for below.
        data = self._read_now.pop(job_id, None)
        fresh = data is None  # not read in this pass: perhaps edited by hand as it waited
        if fresh:
            data = p.read_json_or_none(job_file)
        if data is None or data.get(p.F_STATE) != p.JobState.QUEUED:
            return None
        if fresh and (self._hand_edited(job_id, data) or self._unknown_kind(job_id, data)):
            return None
        if self._stop_asked(job_id):
            self._cancel_unstarted(job_id)
            return None
        blocker = self._blocker(job_id, data)
        if blocker is not None:
            self._queue.hold(job_id, data)
            self._waiting.setdefault(blocker, []).append(job_id)
            return None
        unmet = self._dependencies.unmet(job_id, data)
        if unmet is not None:
            self._end_unstarted(job_id, p.JobState.FAILED, p.ErrorType.DEPENDENCY, unmet)
            return None
        return data

    def _start(self, job_id: str, data: dict[str, Any]) -> bool:
        """Claim the job and start its runner; False if the data folder cannot be
        written now (the job is queued again)."""
        life = JobLife(job_id, self._file(job_id), self.launcher)
        try:
            started = life.start(self.kinds[data[p.F_KIND]], data, self._wakeups.nudge)
        except ClaimedAlready:  # by a runner started by hand: watched as one of ours
            self._counting.started(data)
            self._adopt(job_id, data)
            return True
        except ClaimFailed as exc:
            if self._own_folder_refuses(job_id, exc):
                self._retry_later(job_id, data, CLAIM_RETRY_S)
                return True  # the others go on
            if not self._blocked:
                log.warning("jobs wait: %s", exc if isinstance(exc, CannotStartNow)
                            else f"cannot write to the data folder ({exc})")
            self._blocked = True
            self._enqueue(job_id, data)
            return False
        self._blocked = False  # a next hold-up is said again
        if started:
            self._counting.started(data)
            self._now_running(job_id, life, data)
        else:
            self._settle(life)
        return True

    def _own_folder_refuses(self, job_id: str, exc: ClaimFailed) -> bool:
        """Whether a claim was refused by the job's own folder (its permissions, made
        immutable) while the jobs folder takes writes: that job alone waits."""
        if isinstance(exc, CannotStartNow) or exc.errno not in (errno.EPERM, errno.EACCES):
            return False
        if not os.access(self.dir, os.W_OK):
            return False
        log.warning("job %s waits %g s: its folder refuses its launch claim (%s); the "
                    "other jobs go on", job_id, CLAIM_RETRY_S, exc)
        return True

    def _retry_later(self, job_id: str, data: dict[str, Any], delay_s: float) -> None:
        self._queue.add_later(job_id, data, time.time() + delay_s)

    def _hand_edited(self, job_id: str, data: dict[str, Any],
                     seen: Signature | None = None) -> bool:
        """Whether a queued job's file (as it was `seen` before it was read) is no job the
        API can show (edited by hand, say a `timeout_s` of "abc"): the API reads it as
        failed, corrupt, so it never runs (until it is written again)."""
        if not_a_job(job_id, data) is None:
            return False
        self._queue.discard(job_id)
        self._known_damaged(job_id, seen)  # the jobs that depend on it fail
        return True

    def _unknown_kind(self, job_id: str, data: dict[str, Any]) -> bool:
        """Whether a queued job's kind is none this supervisor runs (edited by hand, or a
        kind since removed from OFFLOAD_KINDS): it fails, unstarted."""
        kind = data.get(p.F_KIND)
        if isinstance(kind, str) and kind in self.kinds:
            return False
        self._queue.discard(job_id)
        self._end_unstarted(job_id, p.JobState.FAILED, p.ErrorType.RUNNER,
                            f"unknown job kind {kind!r}")
        return True

    def _blocker(self, job_id: str, data: dict[str, Any]) -> str | None:
        """The live job a job must wait for: the first its `depends_on` names that has not
        ended (and had its final state written); a chat's earlier turn its `after` names
        (queued ahead of it, running, or its next attempt waiting for room), else its
        session's running chat; None: it may start."""
        dependency = self._dependencies.blocker(job_id, data)
        if dependency is not None:
            return dependency
        after = data.get(p.F_AFTER)
        if isinstance(after, str) and after != job_id:
            ahead = self._queue.key_of(after)
            if after in self._running or (ahead is not None
                                          and ahead[1:] < p.queue_key(data)[1:]):
                return after
            held = self._unwritten.get(after)  # its end (or its next attempt) waits for room
            if held.runs_again if held is not None else self._unseen_live(after):
                return after
        session = p.chat_session(data.get(p.F_KIND), data.get(p.F_INPUT))
        return self._running_chat_by_session.get(session) if session is not None else None
