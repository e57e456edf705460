"""Each queued job's place in the queue, counted as the supervisor launches them."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from jobs import protocol as p
from jobs.protocol import control, embedded

# The reasons most queued jobs share, one dict each for them all (read only).
IN_LINE = {p.WAITS_REASON: p.F_QUEUE_POSITION}
NOT_DUE = {p.WAITS_REASON: p.F_RUN_AT}


class Count(NamedTuple):
    """The queue as counted: each queued job's place (those with one) and why each waits
    (`waits_for`), by id; and when the first job not due yet will be (POSIX time; inf if
    none): the order changes then."""

    positions: dict[str, int]
    waits: dict[str, dict[str, Any]]
    next_due: float


def count_positions(queued: Iterable[dict[str, Any]], running: dict[tuple[str, str], int],
                    caps: dict[str, int], model_slots: int | None = None) -> Count:
    """The places of `queued` (the jobs that wait for no other) and why each waits.
    `running`: the live jobs by (kind, state), `caps`: the kinds' own caps now
    (`kind_caps_now`); chats no more than the embedded model's `model_slots`."""
    # The supervisor's order: due jobs by priority, then submission; then the jobs
    # not due yet, soonest first. One waiting for another job has none, nor one its
    # kind's cap holds back (beyond the room its kind has now).
    now = time.time()
    ordered = sorted((_launch_order(job, now), str(job.get(p.F_KIND))) for job in queued)
    in_use = dict(caps)
    chats = embedded.kind_cap(embedded.CHAT_KIND, caps.get(embedded.CHAT_KIND), model_slots)
    if chats is not None:
        in_use[embedded.CHAT_KIND] = chats
    running_now = {kind: running.get((kind, p.JobState.RUNNING.value), 0) for kind in in_use}
    room = {kind: cap - running_now[kind] for kind, cap in in_use.items()}
    positions: dict[str, int] = {}
    waits: dict[str, dict[str, Any]] = {}
    for order, kind in ordered:
        job_id = order[-1]
        waits[job_id] = NOT_DUE if order[0] > 0.0 else IN_LINE
        if kind in room:
            if room[kind] <= 0:
                if order[0] == 0.0:  # due: its kind's cap alone holds it
                    waits[job_id] = _held(kind, in_use[kind], running_now[kind],
                                          caps.get(kind), model_slots)
                continue
            room[kind] -= 1
        positions[job_id] = len(positions)
    next_due = min((order[0] for order, _ in ordered if order[0] > 0.0), default=math.inf)
    return Count(positions, waits, next_due)


def _held(kind: str, cap: int, running: int, own_cap: int | None, model_slots: int | None
          ) -> dict[str, Any]:
    """`waits_for` of a due job its kind's cap (`cap`, in use) holds back: for chats, the
    embedded model's slots where they are the cap, and the chats' `own_cap` with them where
    it is as low (more slots alone would start none)."""
    if kind == embedded.CHAT_KIND and cap == model_slots:
        held = {p.WAITS_REASON: p.WAITS_MODEL_SLOTS, p.WAITS_MODEL_SLOTS: cap,
                "running": running}
        return {**held, p.WAITS_KIND_CAP: own_cap} if own_cap == cap else held
    return {p.WAITS_REASON: p.WAITS_KIND_CAP, p.WAITS_KIND_CAP: cap, "running": running}


def waiting_for_jobs(job: dict[str, Any], waited: list[str]) -> dict[str, Any]:
    """`waits_for` of a job that waits for others to end (`waited`, of those `awaited`
    names): the jobs its `depends_on` names, else the chat's earlier turn."""
    dependencies = [each for each in p.dependencies(job) if each in waited]
    if dependencies:
        return {p.WAITS_REASON: p.F_DEPENDS_ON, "jobs": dependencies}
    return {p.WAITS_REASON: p.F_AFTER, "jobs": waited}


def kind_caps_now(jobs_dir: Path, kind_caps: dict[str, int]) -> dict[str, int]:
    """The kinds' own caps: the settings', and over them those set while running
    (`queue.cap`)."""
    try:
        _, set_now = control.queue_caps(jobs_dir.parent)
    except OSError:  # out of file handles, say: the settings' caps meanwhile
        set_now = {}
    return {**kind_caps, **set_now}


def awaited(job: dict[str, Any]) -> list[str]:
    """The jobs `job` may wait for: those its `depends_on` names, and the chat's earlier
    turn its `after` names."""
    after = job.get(p.F_AFTER)
    return [*p.dependencies(job), *([after] if isinstance(after, str) else [])]


def _launch_order(job: dict[str, Any], now: float) -> tuple[float, int, int, str]:
    start_at = p.run_at(job)
    return (0.0 if start_at is None or start_at <= now else start_at, *p.queue_key(job))
