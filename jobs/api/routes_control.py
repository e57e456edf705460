"""/api/schedules and /api/queue: the periodic schedules and the queue, each pausable,
and the queue's caps on runners (of all, and of a kind), which can be changed while the
server runs.

A switch is a file in the data folder (`jobs.protocol.control`), so every API worker and
the supervisor see it, and it outlasts a restart; after a resume the supervisor is woken
at once.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.api.errors import FREE_SPACE_ADVICE
from jobs.api.routes_jobs import Service
from jobs.api.service import JobService
from jobs.kinds import UnknownKind, registry
from jobs.protocol import control
from jobs.protocol.wake import poke
from jobs.schedules import Schedule, by_name, configured, schedule_file
from jobs.settings import Settings
from jobs.store.job_store import JobNotFound, JobStore

router = APIRouter(prefix="/api", tags=["schedules and queue"])
UNRECORDED: dict[int | str, dict[str, Any]] = {
    503: {"description": "the data folder cannot be written: the switch was not recorded"},
    507: {"description": "the data folder's disk is full: the switch was not recorded"}}
UNKNOWN: dict[int | str, dict[str, Any]] = {404: {"description": "no schedule of that name"},
                                            **UNRECORDED}


class ScheduleView(BaseModel):
    name: str
    kind: str
    every_s: float | None  # null: at the times `cron` gives
    cron: str | None
    timezone: str | None  # of cron's times (null: UTC)
    input: dict[str, Any]
    priority: int | None  # null: the kind's default
    paused: bool
    next_run_at: str | None  # null while paused; in the past: due, created at once
    last_job_id: str | None
    last_state: p.JobState | None  # null when its last job was pruned, or none ran yet


class ScheduleList(BaseModel):
    schedules: list[ScheduleView]
    # Why the file's latest change is not applied (the schedules listed are the last
    # good ones); null when the file is in use as it is.
    error: str | None


class QueueView(BaseModel):
    paused: bool
    max_concurrent: int  # runners alive at once, now
    max_concurrent_default: int  # OFFLOAD_MAX_CONCURRENT: what `null` goes back to
    max_concurrent_set: bool  # set while running (kept across restarts), not the default
    kind_caps: dict[str, int]  # runners of a kind at once, now (a kind not named: no cap)
    kind_caps_default: dict[str, int]  # OFFLOAD_KIND_CAPS: what `null` for a kind goes back to
    kind_caps_set: list[str]  # the kinds whose cap was set while running
    kinds: list[str]  # every job kind this server runs, a cap of its own or not
    # Chats the embedded model decodes at once: no more run, whatever the caps (null:
    # chats go to the server OPENAI_BASE_URL names).
    model_slots: int | None = None
    # The server the embedded model runs on: llama-cpp-python's has one slot, whatever
    # OFFLOAD_LLM_SLOTS says (null: chats go to the server OPENAI_BASE_URL names).
    model_engine: Literal["llama-server", "llama-cpp-python"] | None = None


class QueueCap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # null: back to OFFLOAD_MAX_CONCURRENT (or, with `kind`, to OFFLOAD_KIND_CAPS's)
    max_concurrent: int | None = Field(ge=1, le=control.MAX_CAP, strict=True)
    kind: str | None = Field(None, max_length=64,
                             description="cap the runners of this kind, not of all")


@router.get("/schedules", response_model=ScheduleList)
async def list_schedules(service: Service) -> dict[str, Any]:
    """The periodic schedules of OFFLOAD_SCHEDULES_FILE, with their next and last runs."""
    store = service.store
    views = await run_in_threadpool(lambda: [_view(store, each) for each in configured()])
    return {"schedules": views, "error": schedule_file().error}


@router.post("/schedules/{name}/pause", response_model=ScheduleView, responses=UNKNOWN)
async def pause_schedule(name: str, service: Service) -> dict[str, Any]:
    """Create no more jobs of this schedule (those created already run); kept across restarts."""
    return await _switch_schedule(service.store, name, True)


@router.post("/schedules/{name}/resume", response_model=ScheduleView, responses=UNKNOWN)
async def resume_schedule(name: str, service: Service) -> dict[str, Any]:
    """Create this schedule's jobs again; the current slot's job at once if it has none."""
    return await _switch_schedule(service.store, name, False)


@router.get("/queue", response_model=QueueView)
async def queue_state(service: Service) -> dict[str, Any]:
    return await run_in_threadpool(queue_view, service.settings)


def queue_view(settings: Settings) -> dict[str, Any]:
    data_dir = settings.data_dir
    cap, kinds = control.queue_caps(data_dir)
    known = registry()  # a kind's cap outlives the kind (its runner removed): not shown
    return {"paused": control.queue_paused(data_dir),
            "max_concurrent": cap or settings.max_concurrent,
            "max_concurrent_default": settings.max_concurrent,
            "max_concurrent_set": cap is not None,
            "kind_caps": {kind: each for kind, each in {**settings.kind_cap_map, **kinds}.items()
                          if kind in known},
            "kind_caps_default": settings.kind_cap_map,
            "kind_caps_set": sorted(kind for kind in kinds if kind in known),
            "kinds": sorted(known), "model_slots": settings.model_slots,
            "model_engine": settings.model_engine}


@router.put("/queue/cap", response_model=QueueView, responses=UNRECORDED)
async def set_queue_cap(body: QueueCap, service: Service) -> dict[str, Any]:
    """Change how many runners are alive at once (of one kind, with `kind`), kept across
    restarts; `null` goes back to OFFLOAD_MAX_CONCURRENT (OFFLOAD_KIND_CAPS's). Running
    jobs over a lower cap finish; none starts until fewer run."""
    data_dir = service.settings.data_dir
    if body.kind is not None and body.kind not in registry():
        # A cap set for a kind no longer known can still be taken away; any other is a typo.
        caps = await run_in_threadpool(control.queue_caps, data_dir)
        if body.max_concurrent is not None or body.kind not in caps[1]:
            raise UnknownKind(body.kind)
    await run_in_threadpool(_set_cap, data_dir, body.max_concurrent, body.kind)
    poke(service.store.dir)  # a higher cap starts queued jobs at once
    return await run_in_threadpool(queue_view, service.settings)


@router.post("/queue/pause", response_model=QueueView, responses=UNRECORDED)
async def pause_queue(service: Service) -> dict[str, Any]:
    """Start no job: running ones finish, queued and new ones wait; kept across restarts."""
    return await _switch_queue(service, True)


@router.post("/queue/resume", response_model=QueueView, responses=UNRECORDED)
async def resume_queue(service: Service) -> dict[str, Any]:
    """Start queued jobs again, at once."""
    return await _switch_queue(service, False)


async def _switch_queue(service: JobService, paused: bool) -> dict[str, Any]:
    await run_in_threadpool(_write, control.set_queue_paused, service.settings.data_dir,
                            paused)
    if not paused:
        poke(service.store.dir)
    return await run_in_threadpool(queue_view, service.settings)


async def _switch_schedule(store: JobStore, name: str, paused: bool) -> dict[str, Any]:
    schedules = await run_in_threadpool(by_name)  # may read the file again
    schedule = schedules.get(name)
    if schedule is None:
        known = ", ".join(sorted(schedules)) or "none (no schedules file, or an empty one)"
        raise HTTPException(404, f"no schedule named {name[:100]!r}; the schedules are: "
                                 f"{known}. They are read from OFFLOAD_SCHEDULES_FILE "
                                 "(schedules.toml by default), again about a second after "
                                 "a change")
    await run_in_threadpool(_write, control.set_schedule_paused, store.dir.parent, name, paused)
    if not paused:
        poke(store.dir)
    return await run_in_threadpool(_view, store, schedule)


def _set_cap(data_dir: Path, cap: int | None, kind: str | None) -> None:
    def change() -> None:
        # Read, changed and written: one change at a time, whichever API worker makes it
        # (a lock not had in time is an OSError too: a 503 to retry).
        with FileLock(control.queue_cap_lock(data_dir), timeout=10):
            control.set_queue_cap(data_dir, cap, kind)

    _write(change)


def _write(switch: Any, *args: Any) -> None:
    try:
        switch(*args)
    except OSError as exc:
        raise _unusable(exc, "cannot record the switch in") from exc


def _unusable(exc: OSError, doing: str) -> HTTPException:
    """A 503 (507 for a full disk) that names the file the switch needs and what to do."""
    where = exc.filename2 or exc.filename  # a replace's target
    # A folder in a switch's place (Windows denies access to it: no EISDIR there).
    misplaced = exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST) or (
        isinstance(where, str) and not where.endswith(p.TMP_SUFFIX) and os.path.isdir(where))
    if isinstance(where, str) and where.endswith(p.TMP_SUFFIX):  # a temporary file's random
        where = os.path.dirname(where)  # name: the folder it could not be made in
    said = f"{doing} {where or 'the data folder'}: {exc.strerror or exc}"
    if exc.errno in p.DISK_FULL:
        return HTTPException(507, f"{said}; {FREE_SPACE_ADVICE}")
    if misplaced:
        return HTTPException(503, f"{said}: a folder is where a file goes, or a file where a "
                                  "folder goes; move it away, then retry")
    return HTTPException(503, f"{said}; check that the data folder is writable and has free "
                              "space, then retry")


def _view(store: JobStore, schedule: Schedule) -> dict[str, Any]:
    data_dir = store.dir.parent
    try:
        paused = control.schedule_paused(data_dir, schedule.name)
    except OSError as exc:
        raise _unusable(exc, f"cannot tell whether schedule {schedule.name} is paused: "
                             "cannot read") from exc
    last = control.last_fired(data_dir, schedule.name) or {}
    last_job_id = last.get("job_id") if isinstance(last.get("job_id"), str) else None
    last_state = None
    if last_job_id is not None:
        try:
            last_state = store.read(last_job_id).get(p.F_STATE)
        except JobNotFound:
            pass  # pruned
    slot = schedule.slot(time.time())
    if schedule.has_job(last, slot):
        slot = schedule.next_slot(slot)  # this slot's job exists: the next slot's
    return {"name": schedule.name, "kind": schedule.kind, "every_s": schedule.every_s,
            "cron": schedule.cron, "timezone": schedule.timezone,
            "input": schedule.input, "priority": schedule.priority, "paused": paused,
            "next_run_at": None if paused else p.iso(schedule.starts(slot)),
            "last_job_id": last_job_id, "last_state": last_state}
