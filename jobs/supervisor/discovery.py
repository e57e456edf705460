"""Discovery, a part of the Supervisor (`jobs.supervisor.loop`): how it comes to know the
jobs on disk. A full pass lists the folder; a quick one looks at the jobs an event named.
Each job seen for the first time is queued, adopted (its runner started by an earlier
supervisor) or known final.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs import protocol as p
from jobs.launch.base import Launcher
from jobs.launch.pick import adopting_launcher
from jobs.protocol.counters import removed_note_path
from jobs.store.folder_listing import DirListing
from jobs.store.reading import Signature, stat_job_file, stat_signature
from jobs.supervisor.counting import Counting
from jobs.supervisor.dependencies import Dependencies
from jobs.supervisor.launch_queue import LaunchQueue
from jobs.supervisor.lifecycle import JobLife
from jobs.supervisor.wakeups import Wakeups

log = logging.getLogger(__name__)

DAMAGED_LOOK_S = 1.0  # how often the damaged job files are looked at for a change


class Discovery:
    """Mixed into the Supervisor: its state, set in loop.py, as used here."""

    runner_env: dict[str, str]
    log_max_bytes: int | None
    _dir_name: str
    _queue: LaunchQueue
    _cap_now: int
    _listing: DirListing
    _names: set[str]
    _launchers: dict[str, Launcher]
    _wakeups: Wakeups
    _read_now: dict[str, dict[str, Any]]
    _running: dict[str, JobLife]
    _unwritten: dict[str, JobLife]
    _known_final: set[str]
    _dependencies: Dependencies
    _unreadable: set[str]
    _damaged: dict[str, Signature]
    _next_damaged_look: float
    _counting: Counting

    if TYPE_CHECKING:  # the Supervisor's other parts (loop.py, launching.py, endings.py)
        def _file(self, job_id: str) -> Path: ...
        def _enqueue(self, job_id: str, data: dict[str, Any]) -> None: ...
        def _now_running(self, job_id: str, life: JobLife, data: dict[str, Any]) -> None: ...
        def _handle_stops(self, stop_ids: set[str]) -> None: ...
        def _start_stop(self, life: JobLife, reason: str) -> None: ...
        def _hand_edited(self, job_id: str, data: dict[str, Any],
                         seen: Signature | None = None) -> bool: ...
        def _unknown_kind(self, job_id: str, data: dict[str, Any]) -> bool: ...
        def _known_final_now(self, job_id: str, state: object = None) -> None: ...
        def _finalize(self, life: JobLife) -> None: ...

    def _look_at(self, job_ids: set[str]) -> None:
        """The jobs an event named: a new one joins the queue, a live one may be stopping."""
        for job_id in job_ids:
            if job_id in self._queue or job_id in self._running:
                if self._stop_asked(job_id):
                    self._handle_stops({job_id})
            elif (job_id not in self._known_final and job_id not in self._unwritten
                  and os.path.exists(self._file(job_id))):
                self._names.add(job_id)
                self._discover_one(job_id)

    def _scan(self, sweep: bool) -> tuple[set[str], set[str]]:
        """The jobs on disk, and which of the running ones (`sweep`: of the live ones)
        have a stop request. A look at each is a stat: thousands queued took a fifth of
        a CPU, every SUPERVISOR_INTERVAL_S."""
        names = self._listing.changed(self._names)
        if names is not None:
            self._names = names
        jobs = self._names
        live = (self._queue.ids() | self._running.keys() if sweep else self._running.keys()) & jobs
        stops = {job_id for job_id in live if self._stop_asked(job_id)}
        return jobs, stops

    def _discover(self, job_ids: set[str]) -> None:
        for gone in self._queue.ids() - job_ids:
            self._queue.discard(gone)  # deleted from disk while queued
            self._dependencies.ended(gone)  # the jobs that depend on it fail
        for gone in set(self._running) - job_ids:
            life = self._running[gone]
            # Its folder deleted by hand: the job is no more, and its runner held a slot
            # until its deadline. (The listing may be a moment old: the folder tells.)
            if life.may_stop and not os.path.exists(os.path.dirname(life.job_file)):
                # Removed at a client's word, it had ended (its runner lingers): not said.
                if not os.path.exists(removed_note_path(life.job_file)):
                    log.info("job %s was deleted while it ran; its runner is stopped", gone)
                self._start_stop(life, p.JobState.CANCELLED)
        deleted = self._known_final - job_ids  # after they ended
        if deleted:
            self._dependencies.gone(deleted)
            self._known_final -= deleted
        self._look_at_damaged(job_ids)
        new = (job_ids - self._known_final - self._queue.ids() - self._running.keys()
               - self._unwritten.keys())
        for job_id in new:
            self._discover_one(job_id)

    def _discover_one(self, job_id: str) -> None:
        try:
            self._take_on(job_id)
        except Exception:  # one odd entry must not stop the pass for every other job
            if job_id not in self._unreadable:
                log.exception("job %s cannot be looked at; it is left alone", job_id)
                self._unreadable.add(job_id)

    def _take_on(self, job_id: str) -> None:
        path = self._file(job_id)
        try:  # before the read: a file mended after it is seen changed
            seen: Signature | None = stat_signature(stat_job_file(str(path)))
        except OSError:
            seen = None  # gone (nothing to read) or unreadable (damaged, below)
        try:
            data = p.read_json(path)
        except (p.CorruptJobFile, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in p.NO_FILE_TO_READ:
                raise
            self._known_damaged(job_id, seen)  # reads as failed/corrupt; nothing to run
            return
        if data is None:
            return
        state = data.get(p.F_STATE)
        if state == p.JobState.QUEUED and not self._launched(job_id):
            if self._hand_edited(job_id, data, seen) or self._unknown_kind(job_id, data):
                return
            self._enqueue(job_id, data)
            if len(self._read_now) < self._cap_now:  # no more can launch in a pass
                self._read_now[job_id] = data
        elif state in (p.JobState.QUEUED, p.JobState.RUNNING):
            self._adopt(job_id, data)
        elif state in p.FINAL_STATES:  # never rewritten
            self._known_final_now(job_id, state)
            self._counting.found_final(job_id, data)
        else:  # no state it may have: the API reads it as corrupt
            self._known_damaged(job_id, seen)

    def _known_damaged(self, job_id: str, seen: Signature | None) -> None:
        """A job file that holds no job (as it was `seen` before it was read; None: as it
        is now): known final (failed, corrupt) until it is written again, mended by hand
        say, when it is taken on anew."""
        self._known_final_now(job_id)
        try:
            self._damaged[job_id] = seen or stat_signature(stat_job_file(str(self._file(job_id))))
        except OSError:
            self._known_final.discard(job_id)  # gone or replaced meanwhile: looked at anew

    def _look_at_damaged(self, job_ids: set[str]) -> None:
        """The damaged job files written since: forgotten, to be taken on anew. At most
        every DAMAGED_LOOK_S: a stat each, and a change of the model may damage thousands."""
        now = time.monotonic()
        if now < self._next_damaged_look:
            return
        self._next_damaged_look = now + DAMAGED_LOOK_S
        for job_id, signature in list(self._damaged.items()):
            try:
                same = (job_id in job_ids and stat_signature(
                    stat_job_file(str(self._file(job_id)))) == signature)
            except OSError:
                same = False
            if not same:
                del self._damaged[job_id]
                self._known_final.discard(job_id)
                self._unreadable.discard(job_id)

    def _adopt(self, job_id: str, data: dict[str, Any]) -> None:
        """A job launched by an earlier supervisor: watch it if alive, else it is lost."""
        life = JobLife.adopt(job_id, self._file(job_id), data, self._launcher_for,
                             self._wakeups.nudge)
        if life.has_ended():
            log.info("job %s: runner gone while no supervisor watched it", job_id)
            self._finalize(life)
            return
        log.info("job %s: adopted its %s runner", job_id, life.run.launcher)
        self._now_running(job_id, life, data)

    def _launcher_for(self, record: dict[str, Any]) -> Launcher:
        name = str(record.get("launcher") or p.LOCAL)
        found = self._launchers.get(name)
        if found is None:
            found = self._launchers[name] = adopting_launcher(record, self.runner_env,
                                                              self.log_max_bytes)
        return found

    def _launched(self, job_id: str) -> bool:
        return os.path.exists(p.sibling(self._file(job_id), p.RUN_FILE))

    def _stop_asked(self, job_id: str) -> bool:
        """Whether the job's stop request (a cancel, say) stands in its folder."""
        # No Path: one look a job a pass.
        return os.path.exists(os.path.join(self._dir_name, job_id, p.STOP_FILE))
