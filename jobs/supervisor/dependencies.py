"""`depends_on`: which queued jobs wait for which others, as the supervisor keeps them.

A job starts once every job it depends on has completed. It fails unstarted (error type
`dependency`) as soon as one of them ends otherwise or is gone, or when its dependencies
lead back to it. The API takes only jobs that exist already, so such a circle comes from
job files edited by hand, and holds a job that depends on a later one: only such a job
looks for one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.store.reading import read_job


class Dependencies:
    """`is_live(id)`: the job has not ended (queued, running, or its final state not yet
    written); `is_final(id)`: it is known to have ended; `queued_key(id)`: its launch order
    while queued, else None."""

    def __init__(self, job_file: Callable[[str], Path], is_live: Callable[[str], bool],
                 is_final: Callable[[str], bool],
                 queued_key: Callable[[str], p.QueueKey | None]) -> None:
        self._job_file = job_file
        self._is_live = is_live
        self._is_final = is_final
        self._queued_key = queued_key
        self._depends_on: dict[str, tuple[str, ...]] = {}  # a queued job -> the jobs it waits for
        self._dependents: dict[str, set[str]] = {}  # a job -> the queued jobs that depend on it
        # Queued jobs to look at soon: a job they depend on ended without completing, or
        # had ended before this supervisor saw them.
        self._look_at: set[str] = set()
        # Depended on and known to have completed: never read again, never looked at.
        self._completed: set[str] = set()

    def note(self, job_id: str, data: dict[str, Any]) -> None:
        """A queued job, as its file says (again, when it was edited since)."""
        depends_on = p.dependencies(data)
        if self._depends_on.get(job_id, ()) == depends_on:
            return
        self._depends_on[job_id] = depends_on
        for each in depends_on:
            self._dependents.setdefault(each, set()).add(job_id)
        if any(each not in self._completed and self._is_final(each) for each in depends_on):
            self._look_at.add(job_id)

    def ended(self, job_id: str, state: object = None) -> None:
        """A job ended in `state` (None: not known), or was found so: unless it completed,
        the jobs that depend on it are looked at. (One that completed fails none: they
        start in their turn.)"""
        dependents = self._dependents.get(job_id)
        if not dependents:
            return
        if state == p.JobState.COMPLETED:
            self._completed.add(job_id)
        else:
            self._look_at.update(each for each in dependents
                                 if job_id in self._depends_on.get(each, ()))

    def gone(self, job_ids: set[str]) -> None:
        """Jobs deleted after they ended (by hand, or with a conversation forgotten): the
        jobs that depend on them are looked at, and fail."""
        for job_id in job_ids & self._dependents.keys():
            self._completed.discard(job_id)
            self._look_at.update(each for each in self._dependents[job_id]
                                 if job_id in self._depends_on.get(each, ()))

    def to_look_at(self) -> Iterator[str]:
        """The queued jobs to look at, each once (a job the caller ends meanwhile has its
        own dependents looked at in the same go)."""
        while self._look_at:
            yield self._look_at.pop()

    def blocker(self, job_id: str, data: dict[str, Any]) -> str | None:
        """The first job this one depends on that has not ended; None when none is left,
        or when they lead back to it (it is to fail: see `unmet`). Notes the job first, as
        its file says now."""
        self.note(job_id, data)
        for each in self._depends_on.get(job_id, ()):
            if each != job_id and self._is_live(each):
                return None if self._in_a_circle(job_id, data) else each
        return None

    def unmet(self, job_id: str, data: dict[str, Any]) -> str | None:
        """Why a job can never start: a job it depends on ended without completing, is
        gone, or leads back to it. None while they all completed or some may yet."""
        on = p.dependencies(data)
        if job_id in on or self._in_a_circle(job_id, data):
            return f"its dependencies go round in a circle back to it (through {on[0]})"
        for each in on:
            if each in self._completed and os.path.exists(self._job_file(each)):
                continue  # completed (a stat, at a launch: deleted since, it is gone)
            self._completed.discard(each)
            if self._is_live(each):
                continue  # it may complete yet (a retry, say)
            ended = read_job(each, self._job_file(each)) if p.is_valid_id(each) else None
            if ended is None:
                return f"the job it depends on, {each[:64]}, is gone (deleted)"
            state = ended.get(p.F_STATE)
            if state != p.JobState.COMPLETED:
                return f"the job it depends on, {each}, ended {state}"
            if each in self._dependents:
                self._completed.add(each)  # read once
        return None

    def keep_for(self, queued: set[str]) -> set[str]:
        """Forget the jobs no longer queued; the jobs that the queued ones depend on (a
        finished one among them is kept from pruning: its dependents may start later)."""
        self._depends_on = {job_id: each for job_id, each in self._depends_on.items()
                            if job_id in queued}
        self._dependents = {}
        for job_id, on in self._depends_on.items():
            for each in on:
                self._dependents.setdefault(each, set()).add(job_id)
        self._completed &= self._dependents.keys()
        return set(self._dependents)

    def _in_a_circle(self, job_id: str, data: dict[str, Any]) -> bool:
        """Whether following the dependencies from this job comes back to it; walked only
        from a job that depends on a later one still queued."""
        mine = p.queue_key(data)[1:]
        on = self._depends_on.get(job_id, ())
        if not any((key := self._queued_key(each)) is not None and key[1:] > mine
                   for each in on):
            return False
        seen: set[str] = set()
        todo = list(on)
        while todo:
            step = todo.pop()
            if step == job_id:
                return True
            if step not in seen:
                seen.add(step)
                todo.extend(self._depends_on.get(step, ()))
        return False
