"""/api/jobs: submit (one or several), list, read, cancel (one or several), re-run, remove,
follow (server-sent events), log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import Field
from starlette.types import Receive, Scope, Send

from jobs import protocol as p
from jobs.api.events import BadPosition, change_event, first_event, public, resume_position
from jobs.api.follow import Followed, JobWatch, file_signature, followed, stopping
from jobs.api.guards import asked_head
from jobs.api.service import JobService
from jobs.api.summary import Fields, summary
from jobs.kinds import UnknownKind, registry
from jobs.models import (
    BatchAnswer,
    BatchRefusal,
    CancelAnswer,
    Job,
    JobBatch,
    JobCreate,
    JobIds,
    JobList,
    JobRerun,
)
from jobs.protocol import JobState
from jobs.settings import MAX_WAIT_S
from jobs.store.index import UnknownCursor
from jobs.store.reading import Signature

router = APIRouter(prefix="/api", tags=["jobs"])
MAX_KINDS_LISTED = 20  # `kind` given again: each one no job has is looked for in all


async def get_service(request: Request) -> JobService:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request
    service: JobService = request.app.state.service
    return service


Service = Annotated[JobService, Depends(get_service)]
# Not empty: an empty key would be one key, shared by every client that sends the header
# blank.
KEY_MAX_LENGTH = 255
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                              max_length=KEY_MAX_LENGTH)]
Responses = dict[int | str, dict[str, Any]]
# The errors a route answers besides a 422 (each as {"detail": "what to do"}), for /docs.
NO_JOB: Responses = {404: {"description": "no job with that id"}}
UNWRITABLE: Responses = {
    503: {"description": "the data folder cannot be written: the job was not stored"},
    507: {"description": "the data folder's disk is full: the job was not stored"}}
REFUSED: Responses = {
    **UNWRITABLE,
    409: {"description": "a request with this Idempotency-Key is still storing its job, or "
                         "the chat's conversation is being forgotten; retry"},
    410: {"description": "the chat's conversation was forgotten (its `session_id`, or the "
                         "turn it `follows`), or that turn removed; start a new conversation"},
    429: {"description": "too many jobs queued or kept; retry after `Retry-After` seconds"}}


@router.post("/jobs", status_code=202, response_model=Job, responses=REFUSED)
async def submit_job(body: JobCreate, service: Service, response: Response,
                     idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Start a job; it waits `queued` while the cap is reached. 429 (with `Retry-After`)
    beyond OFFLOAD_MAX_QUEUED queued jobs, or OFFLOAD_MAX_JOBS kept ones."""
    job = await service.submit(body.kind, body.input, body.timeout_s, idempotency_key,
                               body.launch())
    response.headers["Location"] = f"/api/jobs/{job[p.F_ID]}"
    return job


@router.post("/jobs/batch", status_code=202, response_model=BatchAnswer, responses={
    **REFUSED, 409: {"model": BatchRefusal,
                     "description": "a job's conversation is being forgotten, or its key is "
                                    "still in flight: `stored` lists those before it"},
    422: {"model": BatchRefusal,
          "description": "a job does not fit (its place named; `stored`), or the batch is too "
                         "large"},
    429: {"model": BatchRefusal, "description": "too many jobs queued or kept: `stored` lists "
                                                "those before it; retry after `Retry-After` "
                                                "seconds"},
    503: {"model": BatchRefusal,
          "description": "the data folder failed partway: `stored` lists the jobs stored"},
    507: {"model": BatchRefusal,
          "description": "the data folder's disk filled partway: `stored` lists the jobs "
                         "stored"}})
async def submit_jobs(body: JobBatch, service: Service,
                      idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Start several jobs at once, in their order, as RQ's `enqueue_many`: none is stored
    unless all fit (their inputs, dependencies and keys, OFFLOAD_MAX_QUEUED and
    OFFLOAD_MAX_JOBS). A job that cannot be stored (a full disk, say) is answered as it would
    be alone, naming it; `stored` lists the ids of those before it. With an
    Idempotency-Key, the same batch sent again answers the same jobs, and stores the rest."""
    wanted = [(each.kind, each.input, each.timeout_s, each.launch()) for each in body.jobs]
    return {"jobs": await service.submit_many(wanted, idempotency_key)}


@router.post("/jobs/{job_id}/rerun", status_code=202, response_model=Job,
             responses={**REFUSED, **NO_JOB, 409: {"description": "the job has not finished, "
                                                               "or its key is in flight"}})
async def rerun_job(job_id: str, service: Service, response: Response,
                    body: JobRerun | None = None,
                    idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Run a finished job again as a new job (`rerun_of` names the old one): its kind,
    and its input and timeout unless the body gives others."""
    body = body or JobRerun()
    job = await service.rerun(job_id, body.input, body.timeout_s, idempotency_key)
    response.headers["Location"] = f"/api/jobs/{job[p.F_ID]}"
    return job


@router.get("/jobs", response_model=JobList,
            responses={400: {"description": "`before` names no job listed here"}})
async def list_jobs(service: Service,
                    state: Annotated[list[JobState] | None, Query()] = None,
                    kind: Annotated[list[Annotated[str, Field(max_length=64)]] | None,
                                    Query(max_length=MAX_KINDS_LISTED)] = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    before: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
                    fields: Fields = Fields.FULL) -> dict[str, Any]:
    """Jobs, newest first; `before` (a page's `next_before`) gives the next, older page.
    `state` and `kind` given again list the jobs in any of them (`state=queued&state=running`).
    A `kind` the server runs no more still lists its jobs; one it never ran (a typo) is a
    422 that names the kinds, as an unknown `state` is. `fields=summary`: each job without
    its `input` (the start of it in `input_preview`), `output`, `result` (but its
    `usage`) and `loss_curve`, for a table; `GET /api/jobs/{id}` gives one in full."""
    kinds = set(kind or ())
    try:
        jobs, next_before = await service.list_jobs({each.value for each in state or ()},
                                                    kinds, limit, before)
    except UnknownCursor as exc:
        raise HTTPException(400, str(exc)) from None
    # a kind of no job listed, nor known: a typo? (on every page: the first may have been
    # asked without it)
    for each in sorted(kinds - registry().keys() - {job[p.F_KIND] for job in jobs}):
        if not (await service.list_jobs((), {each}, 1))[0]:
            raise UnknownKind(each)
    if fields is Fields.SUMMARY:
        jobs = [summary(job) for job in jobs]
    return {"jobs": jobs, "next_before": next_before}


WAIT_REFUSED: Responses = {
    503: {"description": "`wait_s`: every event stream and wait of this worker is taken, or "
                         "the server is stopping; ask again after `Retry-After` seconds"}}


@router.get("/jobs/{job_id}", response_model=Job, responses={**NO_JOB, **WAIT_REFUSED})
async def get_job(job_id: str, service: Service, request: Request,
                  wait_s: Annotated[float, Query(
                      ge=0, le=MAX_WAIT_S, description="answer once the job has ended, or "
                      "after this many seconds (long polling)")] = 0) -> dict[str, Any]:
    """The job; with `wait_s`, answered once it has ended or after that many seconds,
    whichever comes first (long polling: a script waits without asking again and again)."""
    if wait_s <= 0 or asked_head(request.scope):  # a HEAD has no body to wait for
        return await service.get(job_id)
    path = str(service.store.path(job_id))
    read_as = file_signature(path)
    # Not `get`: a job queued a moment ago is not counted in the index yet, and its place
    # in the queue would cost a look at every live job; counted once the wait is over.
    job = await service.read(job_id)
    if job.get(p.F_STATE) in p.FINAL_STATES:
        return job
    if stopping():
        raise _server_stopping()
    limit = service.settings.max_event_streams
    if _slots.open >= limit:
        raise _slots_taken(limit, "ask again later, or without wait_s")
    _slots.open += 1  # a wait holds a watch as a stream does, and counts as one
    try:
        await _until_final(service, job_id, path, read_as, wait_s, request)
        job = await service.get(job_id)
    except asyncio.CancelledError:
        # Uvicorn's stop cancels a request once its grace is over (where nothing ended
        # the waits as it began: `uvicorn --timeout-graceful-shutdown`), or at once on a
        # second Ctrl+C.
        raise _server_stopping() from None
    finally:
        _slots.open -= 1
    if stopping() and job.get(p.F_STATE) not in p.FINAL_STATES:
        raise _server_stopping()  # the wait ended with the server, not with the job
    return job


def _slots_taken(limit: int, instead: str) -> HTTPException:
    """Every event stream and wait of this worker taken (`OFFLOAD_MAX_EVENT_STREAMS`)."""
    return HTTPException(503, f"too many open event streams and waits ({limit}); {instead}",
                         headers={"Retry-After": "1"})


def _server_stopping() -> HTTPException:
    return HTTPException(503, "the server is stopping; ask again in a moment",
                         headers={"Retry-After": "1"})


@router.delete("/jobs/{job_id}", response_model=Job, responses={
    **NO_JOB, 409: {"description": "the job has finished: there is nothing to cancel"},
    503: {"description": "the data folder cannot be written: the cancel was not recorded"},
    507: {"description": "the data folder's disk is full: the job's final state waits "
                         "for room (the detail says whether the cancel is recorded)"}})
async def cancel_job(job_id: str, service: Service) -> dict[str, Any]:
    """Cancel: a queued job never starts; a running job's whole process tree is stopped."""
    return await service.cancel(job_id)


@router.post("/jobs/cancel", response_model=CancelAnswer, responses={
    503: {"description": "the data folder cannot be written: a cancel was not recorded "
                         "(those before it stand); send them again"},
    507: {"description": "the data folder's disk is full: a job's final state waits for "
                         "room (the detail says whether the cancels are recorded)"}})
async def cancel_jobs(body: JobIds, service: Service) -> dict[str, Any]:
    """Cancel several jobs at once (up to 1000), as `DELETE /api/jobs/{id}` each, but
    every stop is asked before any is acted on: a job cancelled with the jobs that depend
    on it ends `cancelled`, never failing them first (`dependency`). `jobs`: those asked to
    stop, as they are after the wait; `finished`: those that had finished, untouched;
    `missing`: the ids of no job here (removed, pruned, or never submitted)."""
    jobs, finished, missing = await service.cancel_many(body.ids)
    return {"jobs": jobs, "finished": finished, "missing": missing}


@router.post("/jobs/{job_id}/remove", response_model=Job,
             responses={**NO_JOB, 409: {"description": "the job has not finished, or a job "
                                                       "not ended needs it (one that depends "
                                                       "on it, a turn of its chat)"},
                        503: {"description": "its files could not all be deleted, or the "
                                             "pruning of old jobs held it up; retry"}})
async def remove_job(job_id: str, service: Service) -> dict[str, Any]:
    """Delete a finished job now (its file, log and records; a chat turn's question and
    reply), as pruning would later; answers the job as it was."""
    return await service.remove(job_id)


@router.get("/jobs/{job_id}/log", response_class=PlainTextResponse, responses=NO_JOB)
async def job_log(job_id: str, service: Service) -> str:
    """The runner's stdout and stderr (the last megabyte)."""
    return await service.log(job_id)


class _StreamSlots:
    open = 0  # event streams open in this worker


_slots = _StreamSlots()


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, **NO_JOB,
                       400: {"description": "a `Last-Event-ID` or `after` that is no id"},
                       503: {"description": "too many event streams open, or the server "
                                            "is stopping; poll the job"}})
async def job_events(job_id: str, service: Service, request: Request,
                     last_event_id: Annotated[str | None, Header()] = None,
                     after: str | None = None,
                     ) -> StreamingResponse:
    """The job in full, then what changed on every change; closes after the final state.
    Each event's `id` is the length of output it brings the client to: a client that
    comes back with `Last-Event-ID` (or `?after=`) gets the output it missed, once."""
    try:
        position = resume_position(last_event_id, after)
    except BadPosition as exc:
        raise HTTPException(400, str(exc)) from None
    path = str(service.store.path(job_id))
    read_as = file_signature(path)
    first = await service.get(job_id)  # 404 before the stream starts
    if stopping():
        raise _server_stopping()
    limit = service.settings.max_event_streams
    if _slots.open >= limit:
        raise _slots_taken(limit, "poll GET /api/jobs/{id} instead, or retry later")
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if asked_head(request.scope):  # following the job would hold its connection till it ends
        return StreamingResponse(iter(()), media_type="text/event-stream", headers=headers)
    # Taken here, with no await since the check: a burst of requests cannot all pass it.
    _slots.open += 1
    return _HoldingASlot(_follow(service, job_id, path, first, read_as, position),
                         media_type="text/event-stream", headers=headers)


class _HoldingASlot(StreamingResponse):
    """An event stream that gives its slot back when it ends, however it ends (also one
    whose client left before its first event, or a finished job's, whose one event can
    wait as long in a client that does not read)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _slots.open -= 1


async def _follow(service: JobService, job_id: str, path: str, job: dict[str, Any],
                  read_as: Signature, position: int | None) -> AsyncIterator[str]:
    """`job`: read by the route when the file's signature was `read_as`; `position`:
    the output the client already holds, if it resumes."""
    if job.get(p.F_STATE) in p.FINAL_STATES:
        # A final state is never rewritten: nothing to watch.
        yield first_event(public(job), position)
        return
    registry = followed()
    watch = _join(registry, service, job_id, path)
    try:
        version, beats = watch.version, watch.beats
        if file_signature(path) != read_as:  # changed since: the watch may have published it
            job = await service.get(job_id)
        mine = public(job)  # the state this client holds
        yield first_event(mine, position)
        final = mine[p.F_STATE] in p.FINAL_STATES
        while not final:
            await watch.wait(version, beats)
            if watch.version != version:
                version, latest = watch.version, watch.snapshot
                assert latest is not None
                if _older(latest, mine):  # the watch read before the route's own read
                    continue
                final = watch.final
                # The shared event fits a client that holds its base; any other encodes its own.
                text = watch.text if mine is watch.base else change_event(mine, latest)
                mine = latest
                if text is not None:
                    yield text
            elif watch.beats != beats:
                beats = watch.beats
                yield ": keep-alive\n\n"
            else:
                break  # the job file is gone, or the server stops
    finally:
        registry.leave(watch)


def _join(registry: Followed, service: JobService, job_id: str, path: str) -> JobWatch:
    """The job's watch in this worker, shared by its event streams and waits."""

    async def read(job_id: str) -> dict[str, Any]:
        return public(await service.read(job_id))

    return registry.join(job_id, path, read, change_event, service.settings.event_notify)


async def _until_final(service: JobService, job_id: str, path: str, read_as: Signature,
                       wait_s: float, request: Request) -> None:
    """Until the job's watch sees it ended (or removed), `wait_s` has passed, or the client
    has gone (its slot is not held for nobody); `read_as`: the file's signature when the
    route read the job, not ended."""
    registry = followed()
    watch = _join(registry, service, job_id, path)
    try:
        if file_signature(path) != read_as:  # changed before the watch began: look again
            job = await service.read(job_id)
            if job.get(p.F_STATE) in p.FINAL_STATES:
                return

        async def ended() -> None:
            version, beats = watch.version, watch.beats
            while not (watch.final or watch.ended):
                await watch.wait(version, beats)
                version, beats = watch.version, watch.beats

        waiting = asyncio.ensure_future(asyncio.wait_for(ended(), wait_s))
        gone = asyncio.ensure_future(_gone(request))
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for each in (waiting, gone):
                each.cancel()
            # Their ends collected: a TimeoutError is the wait's bound, not an error.
            await asyncio.gather(waiting, gone, return_exceptions=True)
        if gone.done() and not gone.cancelled():
            gone.result()  # a body sent past the limit, say: answered as anywhere else
    finally:
        registry.leave(watch)


async def _gone(request: Request) -> None:
    """Returns once the client has closed its connection (a GET has no body to read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _older(job: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether `job` is an earlier read of `than`: of an earlier attempt, or of the same one
    with its output a strict prefix (an attempt's output is only ever appended to; the
    next attempt's starts again)."""
    attempt, later_attempt = p.attempts(job)[0], p.attempts(than)[0]
    if attempt != later_attempt:
        return attempt < later_attempt
    output, later = str(job.get(p.F_OUTPUT) or ""), str(than.get(p.F_OUTPUT) or "")
    return len(output) < len(later) and later.startswith(output)
