"""Following a job until it ends: its event stream, resumed across a dropped connection,
else long polls or reads."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeVar

from jobs import protocol as p

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


from jobs.cli.client import REQUEST_TIMEOUT_S, Client, Failure, Unreachable, job_path
from jobs.cli.show import is_removed, removed

T = TypeVar("T")

RECONNECT_S = 60.0  # a dropped event stream is resumed for this long (an API restart), then not
POLL_S = 0.5  # how often a followed job is read where the server has no event stream to spare
STREAM_AGAIN_S = 10.0  # and how long, before its event stream is asked for again
WAIT_S = 25  # each long poll's wait (`GET /api/jobs/{id}?wait_s=`): within proxies' 30 s


class RodeOut(Unreachable):
    """Unreachable for RECONNECT_S already: a loop around it rides out no second minute."""


def _gave_up(exc: Unreachable) -> RodeOut:
    return exc if isinstance(exc, RodeOut) else RodeOut(exc.message, exc.reason)


def follow(client: Client, job_id: str,
           on_event: Callable[[dict[str, Any], dict[str, Any]], None]) -> dict[str, Any]:
    """Follow a job's event stream until its final state, resuming a dropped connection
    with Last-Event-ID; `on_event(event, job)` sees each event and the job after it."""
    job: dict[str, Any] = {}
    last_id: str | None = None
    dropped_at: float | None = None
    pause = 0.0
    while True:
        try:
            for event_id, fields in _events_or_reads(client, job_id, last_id, job):
                dropped_at = None
                if not fields:
                    continue  # a read that found nothing new: the server answers
                _apply(job, fields)
                if event_id is not None:
                    last_id = event_id
                on_event(fields, job)
                if job.get(p.F_STATE) in p.FINAL_STATES:
                    return job
        except Unreachable as exc:
            if isinstance(exc, RodeOut) or not job:
                raise
            if dropped_at is not None and time.monotonic() - dropped_at > RECONNECT_S:
                raise _gave_up(exc) from None
        if dropped_at is not None and time.monotonic() - dropped_at > RECONNECT_S:
            raise RodeOut(f"the event stream from {client.url} kept ending before job "
                          f"{job_id} did; see it with: offload show {job_id}")
        # Dropped, or closed before the final state: resume where it stopped.
        if dropped_at is None:
            dropped_at, pause = time.monotonic(), 0.25
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def until_ended(client: Client, job_id: str) -> dict[str, Any]:
    """The job once it has ended, by long polls (`?wait_s=`), resumed for RECONNECT_S
    across a dropped connection (an API restart). Where the server cannot wait (a 503:
    its worker's streams and waits all taken, or it is stopping) or answers at once (a
    server before `wait_s`, another program), the job's event stream is followed instead,
    which reads the job every POLL_S where the server has no stream to spare."""
    dropped_at: float | None = None
    while True:
        asked = time.monotonic()
        try:
            try:
                job: dict[str, Any] | None = client.job(
                    "GET", f"/api/jobs/{job_path(job_id)}?wait_s={WAIT_S}",
                    timeout=WAIT_S + REQUEST_TIMEOUT_S)
            except Failure as exc:
                if exc.status != 503:
                    raise
                job, dropped_at = None, None  # it answers: a restart's minute starts anew
            if job is not None and job.get(p.F_STATE) in p.FINAL_STATES:
                return job
            if job is None or time.monotonic() - asked < WAIT_S / 2:
                follow(client, job_id, lambda event, job: None)
                return client.job("GET", f"/api/jobs/{job_path(job_id)}")  # in full
            dropped_at = None
        except Unreachable as exc:
            now = time.monotonic()  # from the failure: a request can take WAIT_S to fail
            dropped_at = dropped_at or now
            if isinstance(exc, RodeOut) or now - dropped_at > RECONNECT_S:
                raise _gave_up(exc) from None
            time.sleep(1.0)


def reconnecting(ask: Callable[[], T]) -> T:
    """`ask()`, asked again for RECONNECT_S across a dropped connection (an API restart),
    as a wait's long polls are."""
    dropped_at: float | None = None
    while True:
        try:
            return ask()
        except Unreachable as exc:
            now = time.monotonic()
            dropped_at = dropped_at or now
            if isinstance(exc, RodeOut) or now - dropped_at > RECONNECT_S:
                raise _gave_up(exc) from None
            time.sleep(1.0)


def live_jobs(client: Client) -> dict[str, dict[str, Any]]:
    """Every job queued or running, by id, as the listing summarises it: queued, running,
    then queued again, so that a job that starts (or is queued again for a retry) between
    two listings is in one of them."""
    return {str(job[p.F_ID]): job for state in (p.JobState.QUEUED, p.JobState.RUNNING,
                                                p.JobState.QUEUED)
            for job in client.listed(state.value)}


def until_ended_unless_removed(client: Client, job_id: str) -> dict[str, Any]:
    """`until_ended`, or `removed(job_id)` for a job seen before that is gone now: only a
    job that has ended is removed or pruned."""
    try:
        return until_ended(client, job_id)
    except Failure as exc:
        if exc.status != 404:
            raise
        return removed(job_id)


def until_all_ended(client: Client, ids: list[str], full: bool) -> list[dict[str, Any]]:
    """The jobs `ids` once all have ended, in a few requests however many they are: of
    those still listed live, the one that should end last is waited for (`until_ended`),
    until none is; those that have left the live listing are read each round
    (`ended_ones`), before a removal or pruning takes them (else: `removed`)."""
    finals: dict[str, dict[str, Any]] = {}
    while len(finals) < len(ids):
        reconnecting(lambda: _one_ended(client, ids, finals, full))
    return [finals[job_id] for job_id in ids]


def _one_ended(client: Client, ids: list[str], finals: dict[str, dict[str, Any]],
               full: bool) -> None:
    """A round of `until_all_ended`: the jobs that left the live listing read, then one
    still listed waited for."""
    live = live_jobs(client)
    left = [job_id for job_id in ids if job_id not in finals and job_id not in live]
    found = ended_ones(client, set(left), full) if left else {}
    for job_id in left:  # not listed: live though a listing missed it, or removed once ended
        job = found.get(job_id) or read_if_there(client, job_id) or removed(job_id)
        if job.get(p.F_STATE) in p.FINAL_STATES or is_removed(job):
            finals[job_id] = job
    waiting = [job_id for job_id in ids if job_id not in finals and job_id in live]
    if waiting:
        last = max(waiting, key=lambda job_id: (p.run_at(live[job_id]) or 0.0,
                                                p.queue_key(live[job_id])))
        finals[last] = until_ended_unless_removed(client, last)
    elif len(finals) < len(ids):  # live, though a listing missed it: look again shortly
        time.sleep(POLL_S)


def ended_ones(client: Client, ids: set[str], full: bool) -> dict[str, dict[str, Any]]:
    """The jobs `ids` as the listing of every job has them, by id: summaries, page after
    page until all are found; if `full`, whole, the stretch of a page that holds them read
    again (not every job listed before them, each of which can be megabytes). One not
    found (removed) is left out; one removed between its summary and its whole read is
    its summary."""
    found: dict[str, dict[str, Any]] = {}
    for before, page in client.pages(None, "summary"):
        ours = [n for n, job in enumerate(page) if job[p.F_ID] in ids]
        found.update((page[n][p.F_ID], page[n]) for n in ours)
        if ours and full:
            start = str(page[ours[0] - 1][p.F_ID]) if ours[0] else before
            try:
                whole, _ = client.listing(None, "full", start, ours[-1] - ours[0] + 1)
            except Failure as exc:
                if exc.status != 400:  # the job it starts after, removed
                    raise
                whole = []
            found.update((job[p.F_ID], job) for job in whole if job[p.F_ID] in ids)
            # Each of them the stretch missed, read alone: the top of the listing moved
            # (a job submitted since its summary), or the job it starts after was removed.
            missed = [page[n][p.F_ID] for n in ours
                      if not any(job[p.F_ID] == page[n][p.F_ID] for job in whole)]
            found.update((job[p.F_ID], job) for job in (
                read_if_there(client, job_id) for job_id in missed) if job is not None)
        if len(found) == len(ids):
            break
    return found


def read_if_there(client: Client, job_id: str) -> dict[str, Any] | None:
    """The job in full, or None once it is removed (a 404)."""
    try:
        return client.job("GET", f"/api/jobs/{job_path(job_id)}")
    except Failure as exc:
        if exc.status != 404:
            raise
        return None


def _apply(job: dict[str, Any], fields: dict[str, Any]) -> None:
    """An event's fields applied to the job as known so far."""
    if p.F_OUTPUT in fields:  # the whole output: the first event, or a restart
        job[p.F_OUTPUT] = fields[p.F_OUTPUT] or ""
    elif p.OUTPUT_DELTA in fields:
        job[p.F_OUTPUT] = str(job.get(p.F_OUTPUT) or "") + fields[p.OUTPUT_DELTA]
    job.update({k: v for k, v in fields.items() if k not in (p.F_OUTPUT, p.OUTPUT_DELTA)})


def _events_or_reads(client: Client, job_id: str, after: str | None,
                     job: dict[str, Any]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """The job's events after `after`; where every event stream the server allows is
    taken (503), reads of the job every POLL_S for STREAM_AGAIN_S instead, each as an
    event would bring what changed since `job` (empty: nothing), then it ends, and the
    stream is asked for again."""
    try:
        yield from client.events(job_id, after)
        return
    except Failure as exc:
        if exc.status != 503:
            raise
    until = time.monotonic() + STREAM_AGAIN_S
    while True:
        now = client.job("GET", f"/api/jobs/{job_path(job_id)}")
        fields = {k: v for k, v in now.items() if k != p.F_OUTPUT and job.get(k) != v}
        fields.update(p.output_change(job, now) if p.F_OUTPUT in job
                      else {p.F_OUTPUT: str(now.get(p.F_OUTPUT) or "")})
        yield p.event_id(now), fields  # the id the stream would give: resumed there
        if now.get(p.F_STATE) in p.FINAL_STATES or time.monotonic() > until:
            return
        time.sleep(POLL_S)
