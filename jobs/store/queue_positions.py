"""Each queued job's place in the queue, counted as the supervisor launches them."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.protocol import control, embedded


def count_positions(queued: Iterable[dict[str, Any]], running: dict[tuple[str, str], int],
                    caps: dict[str, int]) -> tuple[dict[str, int], float]:
    """The positions of `queued` (the jobs that wait for no other), by id, and when the
    first of them not due yet will be (POSIX time; inf if none): the order changes then.
    `running`: the live jobs by (kind, state), `caps`: the kinds' caps now."""
    # The supervisor's order: due jobs by priority, then submission; then the jobs
    # not due yet, soonest first. One waiting for another job has none, nor one its
    # kind's cap holds back (beyond the room its kind has now).
    now = time.time()
    ordered = sorted((_launch_order(job, now), str(job.get(p.F_KIND))) for job in queued)
    room = {kind: cap - running.get((kind, p.JobState.RUNNING.value), 0)
            for kind, cap in caps.items()}
    positions: dict[str, int] = {}
    for order, kind in ordered:
        if kind in room:
            if room[kind] <= 0:
                continue
            room[kind] -= 1
        positions[order[-1]] = len(positions)
    next_due = min((order[0] for order, _ in ordered if order[0] > 0.0), default=math.inf)
    return positions, next_due


def kind_caps_now(jobs_dir: Path, kind_caps: dict[str, int], model_slots: int | None = None
                  ) -> dict[str, int]:
    """The settings' caps, and over them those set while running (`queue.cap`); chats
    held to the embedded model's slots, as the supervisor holds them."""
    try:
        _, set_now = control.queue_caps(jobs_dir.parent)
    except OSError:  # out of file handles, say: the settings' caps meanwhile
        set_now = {}
    caps = {**kind_caps, **set_now}
    chats = embedded.kind_cap(embedded.CHAT_KIND, caps.get(embedded.CHAT_KIND), model_slots)
    return caps if chats is None else {**caps, embedded.CHAT_KIND: chats}


def awaited(job: dict[str, Any]) -> list[str]:
    """The jobs `job` may wait for: those its `depends_on` names, and the chat's earlier
    turn its `after` names."""
    after = job.get(p.F_AFTER)
    return [*p.dependencies(job), *([after] if isinstance(after, str) else [])]


def _launch_order(job: dict[str, Any], now: float) -> tuple[float, int, int, str]:
    start_at = p.run_at(job)
    return (0.0 if start_at is None or start_at <= now else start_at, *p.queue_key(job))
