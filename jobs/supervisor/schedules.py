"""The leader's part of the periodic schedules (`jobs.schedules`): on each full pass,
each schedule of the file as it is now, unless paused, gets the job of the slot it is
in, unless that slot's job exists already or its previous job is still queued (a paused
queue or a long wait never piles up jobs of one schedule), or started in this slot after
it was held: that job is this slot's run (not two back to back once the queue goes on).

What was created is on disk (`jobs.protocol.control`): the schedule's newest slot, and
the slot's job itself, whose id follows from the slot. The memory here only saves
reading that record again within a slot. So is a copy of the schedules file last
applied: a supervisor started again while the file cannot be used goes on with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.kinds import Launch
from jobs.protocol import control
from jobs.schedules import (
    LAST_GOOD_STAY,
    Schedule,
    ScheduleError,
    ScheduleFile,
    load,
    parse,
    read,
)
from jobs.settings import Settings
from jobs.store.job_store import JobStore, StoreUnavailable

log = logging.getLogger(__name__)

# A new cron series runs its latest time only this soon after it (else it waits for the
# next): added on the minute of its time, a schedule runs then.
CRON_GRACE_S = 60.0
APPLIED_COPY = "applied.toml"  # in the schedules folder, beside the schedules' records

class Scheduler:
    def __init__(self, store: JobStore, schedules: ScheduleFile, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.data_dir = store.dir.parent
        self.schedules = schedules  # read again on a full pass once the file changed
        self.timeout_s = settings.job_timeout_s  # for a schedule without its own
        # schedule -> the job of its slot that exists (its id says its timing and slot)
        self._done: dict[str, str] = {}
        self._failed: dict[str, int] = {}  # schedule -> the slot whose creation was logged
        self._pause_unknown: dict[str, str] = {}  # schedule -> why, as logged
        self._forgotten_said: set[str] = set()  # schedules whose forgotten session was logged

    @classmethod
    def from_settings(cls, settings: Settings, store: JobStore) -> Scheduler:
        copy = store.dir.parent / control.SCHEDULES_FOLDER / APPLIED_COPY
        error = None
        try:
            # Always named here (the API passes its absolute path): a missing file is none.
            data = read(settings.schedules_file)
            schedules = parse(settings.schedules_file, data)
            _keep(copy, data)
        except ScheduleError as exc:
            # The API refuses to start on it; a file spoiled since then stops no jobs.
            schedules, error = _last_applied(copy), f"{exc}; {LAST_GOOD_STAY}"
            log.error("schedules file not applied: %s (%d schedules go on, as last applied)",
                      error, len(schedules))
        if schedules and error is None:
            log.info("%d schedules from %s", len(schedules), settings.schedules_file)
        return cls(store, ScheduleFile(settings.schedules_file, schedules, error,
                                       applied=lambda data: _keep(copy, data)), settings)

    def fire(self, created: Callable[[str], None], now: float | None = None) -> None:
        """Create the due jobs; `created(job_id)` for each new one."""
        now = time.time() if now is None else now
        for schedule in self.schedules.current():
            slot = schedule.slot(now)
            if self._done.get(schedule.name) == schedule.job_id(slot):
                continue
            try:
                paused = control.schedule_paused(self.data_dir, schedule.name)
            except OSError as exc:  # said once, not every slot: the health says it too
                if self._pause_unknown.get(schedule.name) != str(exc):
                    log.warning("schedule %s creates no jobs while it cannot be told whether "
                                "it is paused: %s", schedule.name, exc)
                    self._pause_unknown[schedule.name] = str(exc)
                continue
            self._pause_unknown.pop(schedule.name, None)
            if paused:
                continue
            job_id = self._fire_one(schedule, slot, now)
            if job_id is not None:
                created(job_id)

    def _fire_one(self, schedule: Schedule, slot: int, now: float) -> str | None:
        """The slot's new job's id; None if it needs none now or could not be stored."""
        last = control.last_fired(self.data_dir, schedule.name) or {}
        if schedule.has_job(last, slot):
            self._done[schedule.name] = schedule.job_id(slot)
            return None
        if (schedule.cron is not None and not schedule.same_timing(last)
                and now - schedule.starts(slot) >= CRON_GRACE_S):
            # A new cron series (a schedule added, or its times changed) starts with its
            # next time, as crontab would: a nightly job added at noon waits for the night.
            self._without_job(schedule, slot, last)
            return None
        job_id = schedule.job_id(slot)
        new = not self.store.path(job_id).exists()  # else created before its record
        held = last.get("job_id")
        earlier = self._job(held) if new else {}
        if earlier.get(p.F_STATE) == p.JobState.QUEUED:
            return None  # looked at again on the next pass
        if _started_at(earlier) >= schedule.starts(slot):
            # Held through the slots before (a paused queue, a long wait), it started in
            # this one: it is this slot's run, not one more back to back.
            self._record(schedule, slot, str(held))
            return None
        # The defaults a submission gets (priority and attempts by kind), as the API fills them.
        fields = {**Launch(schedule.priority).fields(schedule.kind, self.settings, time.time()),
                  p.F_SCHEDULE: schedule.name}
        try:
            if self._forgotten(schedule):
                self._without_job(schedule, slot, last)
                return None
            if new:
                self.store.create(schedule.kind, schedule.input,
                                  schedule.timeout_s or self.timeout_s, job_id=job_id,
                                  fields=fields)
        except (StoreUnavailable, OSError) as exc:
            self._failed_to(schedule, slot, "create its job", exc)
            return None
        if new:
            log.info("schedule %s: job %s created", schedule.name, job_id)
        if not self._record(schedule, slot, job_id):
            return None
        return job_id if new else None

    def _forgotten(self, schedule: Schedule) -> bool:
        """Whether the schedule's chats go to a conversation that was forgotten: its
        session_id is refused for good, here as by the API (said once a schedule)."""
        session = p.chat_session(schedule.kind, schedule.input)
        if session is None or not self.store.is_session_forgotten(session):
            return False
        if schedule.name not in self._forgotten_said:
            log.warning("schedule %s: its chats' conversation (session_id) was forgotten, "
                        "so it creates none; give it another session_id", schedule.name)
            self._forgotten_said.add(schedule.name)
        return True

    def _without_job(self, schedule: Schedule, slot: int, last: dict[str, Any]) -> None:
        """The slot recorded as its newest, with no job of its own: the next slot is the
        first. The newest job the schedule created stays named (`last_job_id`)."""
        held = last.get("job_id")
        self._record(schedule, slot, held if isinstance(held, str) else None)

    def _record(self, schedule: Schedule, slot: int, job_id: str | None) -> bool:
        """The slot recorded as its newest, run by `job_id` (None: by none)."""
        try:
            control.record_fired(self.data_dir, schedule.name, slot, job_id, schedule.timing())
        except OSError as exc:
            self._failed_to(schedule, slot, "record its slot", exc)
            return False
        self._done[schedule.name] = schedule.job_id(slot)
        return True

    def _failed_to(self, schedule: Schedule, slot: int, what: str, exc: Exception) -> None:
        if self._failed.get(schedule.name) != slot:
            log.warning("schedule %s, slot at %s: cannot %s (retrying): %s",
                        schedule.name, p.iso(schedule.starts(slot)), what, exc)
        self._failed[schedule.name] = slot

    def _job(self, job_id: object) -> dict[str, Any]:
        """The job the schedule's record names, as on disk; {} if none."""
        if not isinstance(job_id, str) or not p.is_valid_id(job_id):
            return {}
        return p.read_json_or_none(self.store.path(job_id)) or {}



def _started_at(job: dict[str, Any]) -> float:
    """When the job started (POSIX time); -inf if it has not, or says no time."""
    started = job.get(p.F_STARTED_AT)
    try:
        return p.parse_iso(started) if isinstance(started, str) else -math.inf
    except ValueError:
        return -math.inf


def _last_applied(copy: Path) -> tuple[Schedule, ...]:
    """The schedules of the file as last applied; none if there is no usable copy."""
    try:
        return load(copy)
    except ScheduleError as exc:
        log.warning("no schedules go on: %s", exc)
        return ()


def _keep(copy: Path, data: bytes | None) -> None:
    """A copy of the schedules file just applied (`data`; None: no file, no copy)."""
    try:
        if data is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(copy)
        else:
            os.makedirs(copy.parent, exist_ok=True)
            p.write_atomic(copy, data, durable=True)
    except OSError as exc:  # only a restart while the file cannot be used needs it
        log.warning("cannot keep a copy of the schedules applied at %s: %s", copy, exc)
