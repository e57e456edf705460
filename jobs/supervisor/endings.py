"""What follows a job's end, a part of the Supervisor (`jobs.supervisor.loop`): its final
state written, or a retry queued after a backoff (either kept, and written again each
full pass, while it cannot be written), its count for /metrics, and the jobs that waited
for it let go, or failed when a job they depend on ended without completing.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs import protocol as p
from jobs.launch.base import Launcher
from jobs.store.reading import read_job
from jobs.supervisor.counting import Counting
from jobs.supervisor.dependencies import Dependencies
from jobs.supervisor.launch_queue import LaunchQueue
from jobs.supervisor.lifecycle import JobLife


class Endings:
    """Mixed into the Supervisor: its state, set in loop.py, as used here."""

    launcher: Launcher
    retry_base_s: float
    retry_max_s: float
    _queue: LaunchQueue
    _running: dict[str, JobLife]
    _waiting: dict[str, list[str]]
    _running_chat_by_session: dict[str, str]
    _unwritten: dict[str, JobLife]
    _known_final: set[str]
    _dependencies: Dependencies
    _counting: Counting

    if TYPE_CHECKING:  # the Supervisor's own (loop.py, discovery.py)
        def _file(self, job_id: str) -> Path: ...
        def _enqueue(self, job_id: str, data: dict[str, Any]) -> None: ...
        def _stop_asked(self, job_id: str) -> bool: ...

    # -- a job's end ---------------------------------------------------------------

    def _finalize(self, life: JobLife) -> None:
        try:
            life.finalize(self._backoff)
        finally:
            self._settle(life)
        self._enqueue_retry(life)

    def _enqueue_retry(self, life: JobLife) -> None:
        """A transient failure with attempts left, its job queued again on disk: on the
        queue too."""
        if life.requeued is not None:
            earlier = life.requeued.get(p.F_EARLIER_ERRORS) or [{}]
            self._counting.retried(life.requeued, str(earlier[-1].get("type")))
            self._enqueue(life.job_id, life.requeued)

    def _backoff(self, attempt: int) -> float:
        """Seconds before attempt `attempt` + 1: exponential, with full jitter."""
        return random.uniform(0, min(self.retry_max_s, self.retry_base_s * 2 ** (attempt - 1)))

    def _end_unstarted(self, job_id: str, state: str, error_type: str, message: str) -> None:
        """A job that ends before its runner started: only its final state to write."""
        life = JobLife(job_id, self._file(job_id), self.launcher)
        life.finish(state, error_type, message)
        self._settle(life)

    def _cancel_unstarted(self, job_id: str) -> None:
        self._end_unstarted(job_id, p.JobState.CANCELLED, p.ErrorType.CANCELLED,
                            "cancelled while queued")  # a retry waiting its turn too

    def _settle(self, life: JobLife) -> None:
        """After a final write: known final, kept to write again, or (gone) forgotten;
        the jobs that waited for it may start."""
        self._let_waiters_go(life.job_id, (life.final_job or {}).get(p.F_STATE)
                        if life.is_final and not life.waits_for_room else None)
        if life.waits_for_room:
            self._unwritten[life.job_id] = life
        elif life.is_final:
            self._known_final.add(life.job_id)
            if life.final_job is not None:
                self._counting.ended(life.final_job)
                life.final_job = None  # counted once, however often it settles

    def _write_held_finals(self, job_ids: set[str]) -> None:
        """Write the final states (or jobs queued again) that could not be written, again
        (`job_ids`: on disk)."""
        for job_id, life in list(self._unwritten.items()):
            if job_id not in job_ids:
                del self._unwritten[job_id]  # deleted meanwhile
                life.release()
                continue
            life.write_held()
            if not life.waits_for_room:
                del self._unwritten[job_id]
                self._settle(life)
                self._enqueue_retry(life)

    def _known_final_now(self, job_id: str, state: object = None) -> None:
        """A job found final (at a start, in any order; `state` None: no job, damaged):
        jobs queued after it are looked at."""
        self._known_final.add(job_id)
        self._dependencies.ended(job_id, state)

    # -- the jobs that wait for another --------------------------------------------

    def _let_waiters_go(self, ended: str, state: object = None) -> None:
        """A job has ended (in `state`, if known): the jobs that waited for it go back on
        the queue."""
        self._dependencies.ended(ended, state)
        for conversation, job_id in list(self._running_chat_by_session.items()):
            if job_id == ended:
                del self._running_chat_by_session[conversation]
        for job_id in self._waiting.pop(ended, ()):
            self._queue.back_in_order(job_id)

    def _recheck_waiting(self) -> None:
        """Waits on a job that is no longer live in any way this supervisor saw end (it
        was deleted, or read before it was discovered): back on the queue."""
        for blocker in list(self._waiting):
            if blocker not in self._running and blocker not in self._queue:
                self._let_waiters_go(blocker)

    def _fail_unmet_dependents(self) -> None:
        """The queued jobs with a dependency that ended without completing fail now, not
        when a slot frees (or the queue is resumed); a chain of them, one after another."""
        for job_id in self._dependencies.to_look_at():
            if job_id not in self._queue:
                continue
            data = p.read_json_or_none(self._file(job_id))
            if data is None or data.get(p.F_STATE) != p.JobState.QUEUED:
                continue
            unmet = self._dependencies.unmet(job_id, data)
            if unmet is None:
                continue  # it starts in its turn, once they all completed
            self._queue.discard(job_id)
            # Its own cancel asked too (several cancelled at once, not yet rung): so it ends.
            if self._stop_asked(job_id):
                self._cancel_unstarted(job_id)
            else:
                self._end_unstarted(job_id, p.JobState.FAILED, p.ErrorType.DEPENDENCY, unmet)

    def _is_live(self, job_id: str) -> bool:
        """Whether a job has not ended: queued, running, its final state not yet written,
        or queued or running on disk though this supervisor has not seen it yet."""
        return (job_id in self._running or job_id in self._queue
                or job_id in self._unwritten or self._unseen_live(job_id))

    def _unseen_live(self, job_id: str) -> bool:
        """Whether a job this supervisor has not seen queued, running or ending is queued
        or running on disk (the next full pass takes it on)."""
        if (job_id in self._known_final or job_id in self._queue or job_id in self._running
                or not p.is_valid_id(job_id)):
            return False
        state = (read_job(job_id, self._file(job_id)) or {}).get(p.F_STATE)
        return state in (p.JobState.QUEUED, p.JobState.RUNNING)
