"""Whether new jobs may be stored: room under OFFLOAD_MAX_QUEUED and OFFLOAD_MAX_JOBS,
and the jobs they depend on still here. A refusal says what to do next."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from jobs import protocol as p
from jobs.kinds import InvalidInput, Launch
from jobs.protocol import control
from jobs.settings import RETRY_AFTER_S, Settings
from jobs.store.index import Load
from jobs.store.job_store import JobStore


class Overloaded(Exception):
    """Too much work is waiting or kept: try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


def admit(settings: Settings, load: Load, jobs: int = 1) -> None:
    """Refuse `jobs` new ones beyond OFFLOAD_MAX_QUEUED queued, or beyond
    OFFLOAD_MAX_JOBS kept when not enough finished jobs may be pruned to make room.
    Admitted on the index snapshot's counts plus the jobs this worker stored since
    (several workers, or requests at the same moment, may overshoot a little); refused
    only on counts made now (see `JobService.submit`)."""
    queued = load.counts.get(p.JobState.QUEUED, 0)

    def these(count: int) -> str:
        return "" if jobs == 1 else f", these {jobs} would make {count},"

    if queued + jobs > settings.max_queued:
        if control.queue_paused(settings.data_dir):  # none starts until it is resumed
            when = ("the queue is paused, so none starts until it is resumed (`offload "
                    "resume`, or POST /api/queue/resume): resume it, then retry")
        else:
            when = "retry after Retry-After seconds, when some have started"
        raise Overloaded(
            f"{queued} jobs are queued (those waiting for their start time too)"
            f"{these(queued + jobs)} "
            f"and OFFLOAD_MAX_QUEUED is {settings.max_queued}: {when}, or cancel queued "
            "ones, or raise OFFLOAD_MAX_QUEUED", RETRY_AFTER_S)
    must_go = load.total - settings.max_jobs + jobs  # prunable jobs needed to make room
    now = time.time()
    if must_go <= 0 or load.finished_before(now - settings.min_retention_s) >= must_go:
        return
    # Live jobs must finish first, then be kept the minimum retention.
    wait: float = max(RETRY_AFTER_S, settings.min_retention_s)
    if len(load.finished) >= must_go:
        wait = load.finished[must_go - 1] + settings.min_retention_s - now
    prunable = "no finished job" if must_go == 1 else f"fewer than {must_go} finished jobs"
    raise Overloaded(
        f"{load.total} jobs are kept{these(load.total + jobs)} and OFFLOAD_MAX_JOBS "
        f"is {settings.max_jobs}: {prunable} "
        "may be pruned to make room yet (a queued or running job never is, a "
        f"finished one only OFFLOAD_MIN_RETENTION_S ({settings.min_retention_s:g} s) "
        "after it finished, so that its result can be read). Retry after Retry-After "
        "seconds, or raise OFFLOAD_MAX_JOBS", wait)


def fits(admit: Callable[[], None]) -> bool:
    try:
        admit()
    except Overloaded:
        return False
    return True


def check_dependencies(store: JobStore, launch: Launch) -> None:
    """Refuse a job that depends on one this server does not hold."""
    missing = [each for each in launch.depends_on if not store.path(each).exists()]
    if missing:
        raise InvalidInput(f"depends_on: no job {', '.join(missing[:5])}"
                           f"{' and more' if len(missing) > 5 else ''} (removed, pruned, or never "
                           "submitted here): give the ids of jobs this server holds")
