"""What the routes ask of the job system, with every disk touch in a worker thread but
a submission (its job file, its Idempotency-Key's file, the admission check against the
index snapshot) and a job's GET and event stream, which `SmallIO` runs on the event loop
while that stays quick.

Knows the store, the supervisor and idempotency; nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.api.history import MetricsReader, summary
from jobs.kinds import InvalidInput, Launch, UnknownKind, validate_input
from jobs.protocol import control
from jobs.protocol.wake import poke
from jobs.settings import CANCEL_WAIT_S, RETRY_AFTER_S, Settings
from jobs.store.idempotency import PENDING_S, Claim, key_name
from jobs.store.index import Load
from jobs.store.job_store import JobNotFound, JobStore, StoreUnavailable

LOG_MAX_BYTES = 1_000_000  # /log returns at most the last megabyte
CONTEXT_WINDOW_S = 600.0  # the chat expert sees a summary of the last ten minutes
OVERVIEW_MAX_AGE_S = 0.25  # /api/history and /api/health may be this stale; a job read never
INLINE_MAX_S = 0.005  # a file operation run on the event loop must take less than this
INLINE_PAUSE_S = 60.0  # after one that took longer, worker threads for this long
# One slow operation is a hiccup (an fsync after a quiet spell); another this soon after
# the last says the disk is slow, a warning.
SLOW_AGAIN_S = 600.0
KEY_POLL_S = 0.05  # how often a request waits on a key whose job is being stored
KEY_WAIT_S = 3 * PENDING_S  # and gives up after this long (a claim that never ages)
TURN_LOCKS = 64
WAITING_TURN = "waits for the previous answer in its conversation"

log = logging.getLogger(__name__)
T = TypeVar("T")


class SmallIO:
    """Runs a small file operation right on the event loop while such operations take
    under INLINE_MAX_S, and in worker threads for a while after one that did not.

    Writing a job (a folder and a 1 KB file) is far quicker than the hop to a worker
    thread and back, which costs two thread wake-ups (docs/benchmarks.md). A slow or
    remote disk (an operation over INLINE_MAX_S) sends these operations to worker threads
    for INLINE_PAUSE_S.
    """

    def __init__(self) -> None:
        # Monotonic time from which operations may run inline. Never on Windows: a file
        # being replaced there refuses readers for a moment (read_json sleeps and retries),
        # and virus scanners make opening a file slow.
        self._inline_from = 0.0 if os.name == "posix" else math.inf
        self._slow_at: float | None = None  # monotonic time of the last slow operation

    async def run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        if time.monotonic() < self._inline_from:
            return await run_in_threadpool(func, *args)
        started = time.perf_counter()
        try:
            return func(*args)
        finally:
            took = time.perf_counter() - started
            if took > INLINE_MAX_S:
                now = time.monotonic()
                again = self._slow_at is not None and now - self._slow_at < SLOW_AGAIN_S
                self._slow_at, self._inline_from = now, now + INLINE_PAUSE_S
                log.log(logging.WARNING if again else logging.INFO,
                        "%s took %.1f ms%s; the API touches job files from worker threads "
                        "for the next %.0f s", what, took * 1000,
                        ", again: is the data folder on a slow disk?" if again else "",
                        INLINE_PAUSE_S)


class AlreadyFinished(Exception):
    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job[p.F_ID]} has already finished ({job[p.F_STATE]})")
        self.job = job


class NotRerunnable(Exception):
    """A job still queued or running was asked to run again."""


class StillNeeded(Exception):
    """A job asked to be removed that has not finished, or that a live job needs."""


class NotRemoved(Exception):
    """A job's folder that could not be deleted in full."""


class BeingForgotten(Exception):
    """A turn sent to a conversation while it is being forgotten."""


class IdempotencyConflict(ValueError):
    pass


class KeyInFlight(Exception):
    """Another request with the same Idempotency-Key is still storing its job."""


class BatchStopped(Exception):
    """A batch's job `at` was not stored (`cause`, answered as it would be alone); `stored`:
    the ids of those before it, which were."""

    def __init__(self, cause: Exception, at: int, stored: list[str], keyed: bool) -> None:
        super().__init__(f"jobs[{at}]: {cause}")
        self.cause, self.at, self.stored, self.keyed = cause, at, stored, keyed

    def what_was_stored(self) -> str:
        if not self.stored:
            return "No job of the batch was stored."
        those = ("The job before it was" if len(self.stored) == 1
                 else f"The {len(self.stored)} before it were")
        if not isinstance(self.cause, (StoreUnavailable, KeyInFlight, Overloaded)):
            return f"{those} stored (their ids are in `stored`), it and those after it not."
        again = ("send the batch again with the same Idempotency-Key to store the rest"
                 if self.keyed else "send only the rest again")
        return f"{those} stored (their ids are in `stored`): once it can be, {again}."


class Overloaded(Exception):
    """Too much work is waiting or kept: try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


@dataclass(frozen=True)
class _Key:
    name: str  # the key file's name: a hash of the key, which is never stored
    fingerprint: str  # of the request's body


ERASE_ROUNDS = 3  # a conversation's turns listed, stopped and deleted again, at most
UNWRITABLE_SAID_S = 60.0  # a failed write is said by /api/health this long (or until one works)
LOW_DISK_BYTES = 8 << 20  # less free on the data folder's disk is said by /api/health


class JobService:
    def __init__(self, settings: Settings, store: JobStore,
                 metrics: MetricsReader | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.small_io = SmallIO()
        # A chat session's newest job is looked up and the next one stored under one of
        # these (picked by the session): two submissions of one session through this
        # worker never both follow the same job, and other sessions seldom wait.
        self._turn_locks = [threading.Lock() for _ in range(TURN_LOCKS)]
        # Sessions being erased, by how many erasures run: no new turn until all have ended.
        self._forgetting: Counter[str] = Counter()
        self._unwritable: tuple[float, str] | None = None  # the last failed write: when, why

    # -- the data folder's health --------------------------------------------------------

    def failed_to_write(self, why: str) -> None:
        """A request could not write the data folder (a full disk, say)."""
        self._unwritable = (time.monotonic(), why)

    def storage_problems(self) -> list[str]:
        """What keeps jobs from being stored now, in words (blocking: a statvfs)."""
        problems = []
        if self._unwritable is not None:
            ago = time.monotonic() - self._unwritable[0]
            if ago < UNWRITABLE_SAID_S:
                problems.append(f"the data folder failed a request {ago:.0f} s ago: "
                                f"{self._unwritable[1]}")
        # The jobs folder is made with the first job: until then, the disk of the nearest
        # folder that is there.
        there = next((each for each in (self.store.dir, *self.store.dir.parents)
                      if each.is_dir()), self.store.dir)
        try:
            free = shutil.disk_usage(there).free
        except OSError as exc:
            problems.append(f"the data folder's disk cannot be looked at: {exc.strerror or exc}")
        else:
            if free < LOW_DISK_BYTES:
                problems.append(f"the data folder's disk has {free // 1024} KiB free: jobs may "
                                "not be stored or run; free some space")
        return problems

    # -- submit ------------------------------------------------------------------------

    async def submit(self, kind: str, job_input: dict[str, Any], timeout_s: float | None,
                     idempotency_key: str | None = None,
                     launch: Launch | None = None,
                     fields: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store a new job durably (on the event loop while the disk is quick, fsync
        included; see `SmallIO`) and wake the supervisor as soon as its file is in place,
        while its folders are synced. `fields`: set in its job file."""
        job_input = validate_input(kind, job_input)
        timeout = timeout_s or self.settings.job_timeout_s
        launch = launch or Launch()
        key = None if idempotency_key is None else _Key(
            key_name(idempotency_key), _fingerprint(kind, job_input, timeout, launch,
                                                    fields or {}))
        fields = fields or {}
        give_up_at = time.monotonic() + KEY_WAIT_S
        while True:
            # On the event loop only with the index snapshot's counts: never wait for the
            # index lock there (nor for a session's newest job, counted now).
            load = None if p.chat_session(kind, job_input) else self.store.cached_load(
                OVERVIEW_MAX_AGE_S)
            outcome = None
            if load is not None:
                with contextlib.suppress(Overloaded):  # refused only on a count made now
                    outcome = await self.small_io.run("storing a job", self._submit, kind,
                                                      job_input, timeout, key, load, launch,
                                                      fields)
            if outcome is None:
                outcome = await run_in_threadpool(self._submit, kind, job_input, timeout,
                                                  key, None, launch, fields)
            if not isinstance(outcome, Claim):
                break
            assert key is not None
            await self._unblock(key, outcome, give_up_at)
        return outcome

    def _submit(self, kind: str, job_input: dict[str, Any], timeout_s: float,
                key: _Key | None, load: Load | None,
                launch: Launch, fields: dict[str, Any]) -> dict[str, Any] | Claim:
        """The new job (`fields`: set in its file besides the input and `launch`); with a
        key, the job it already created, or its claim when that job is not there (see
        `_unblock`). Without `load`, the jobs are counted now."""
        if key is not None and (found := self._find(key)) is not None:
            return found
        if load is None:
            load = self.store.load(0.0)
        self._admit(load)
        self._check_dependencies(launch)
        job_input = self._with_context(kind, job_input, load.counts)
        session = p.chat_session(kind, job_input)
        with self._turn_lock(session) if session else contextlib.nullcontext():
            self._check_not_forgotten(session)
            job_id = p.new_id()
            if key is not None:
                try:
                    claimed = self.store.keys.claim(key.name, job_id, key.fingerprint)
                except OSError as exc:
                    raise StoreUnavailable(f"cannot record the Idempotency-Key: {exc}") from exc
                if not claimed:  # another request claimed it a moment ago
                    return self._find(key) or Claim(None, None, 0.0)
            created = time.time()  # stamped as its created_at; a delay_s counts from it
            fields = {**launch.fields(kind, self.settings, created), **fields}
            # Only once the key is ours: a retried request must not interrupt its original.
            if session:
                fields = {**fields, **self._take_turn(session, job_input)}
            try:
                job = self.store.create(kind, job_input, timeout_s, job_id=job_id,
                                        key_name=key.name if key else None, fields=fields,
                                        created=created,
                                        on_stored=functools.partial(poke, self.store.dir))
                self._unwritable = None  # it can be written again
                return job
            except StoreUnavailable:
                if key is not None:
                    self.store.keys.drop_own(key.name)
                raise

    async def submit_many(self, wanted: list[tuple[str, dict[str, Any], float | None, Launch]],
                          idempotency_key: str | None = None) -> list[dict[str, Any]]:
        """Store several jobs (kind, input, timeout, launch), in their order, as RQ's
        `enqueue_many` or a Celery group: all are checked, and admitted together, before
        any is stored. With a key, each job's own key is made of it and the job's place,
        so the batch sent again answers the jobs it stored and stores the rest."""
        checked, load = await run_in_threadpool(self._check_batch, wanted, idempotency_key)
        stored: list[dict[str, Any]] = []
        for n, (kind, job_input, timeout, launch, key) in enumerate(checked):
            give_up_at = time.monotonic() + KEY_WAIT_S  # for each job, as for one alone
            try:
                # As one job alone (no fields of its own), on the batch's counts, which were
                # admitted for all: its look at the room passes; its dependencies are looked
                # at again (one may have gone since).
                while isinstance(outcome := await run_in_threadpool(
                        self._submit, kind, job_input, timeout, key, load, launch, {}), Claim):
                    assert key is not None
                    await self._unblock(key, outcome, give_up_at)
            except (StoreUnavailable, KeyInFlight, IdempotencyConflict, BeingForgotten,
                    InvalidInput, Overloaded) as exc:
                raise BatchStopped(exc, n, [job[p.F_ID] for job in stored],
                                   idempotency_key is not None) from None
            stored.append(outcome)
        return stored

    def _check_batch(self, wanted: list[tuple[str, dict[str, Any], float | None, Launch]],
                     idempotency_key: str | None,
                     ) -> tuple[list[tuple[str, dict[str, Any], float, Launch, _Key | None]], Load]:
        """Each job of a batch checked (its input, key, dependencies) and with its key;
        the counts it is admitted on. Raises, naming the first job that does not fit."""
        limit, name = min((self.settings.max_queued, "OFFLOAD_MAX_QUEUED"),
                          (self.settings.max_jobs, "OFFLOAD_MAX_JOBS"))
        if len(wanted) > limit:
            raise InvalidInput(f"{len(wanted)} jobs in one batch, and {name} is {limit}: send "
                               "at most that many at once")
        checked = []
        stored: list[str] = []  # by the batch sent before with this key
        unstored: list[_Key] = []  # the keys of the others
        for n, (kind, job_input, timeout_s, launch) in enumerate(wanted):
            try:
                job_input = validate_input(kind, job_input)
                timeout = timeout_s or self.settings.job_timeout_s
                key = None if idempotency_key is None else _Key(
                    key_name(f"{idempotency_key}\0{n}"),  # no header holds a NUL: no key's twin
                    _fingerprint(kind, job_input, timeout, launch, {}))
                found = None if key is None else self._find(key)
                if isinstance(found, dict):
                    stored.append(found[p.F_ID])
                else:
                    self._check_dependencies(launch)
                    self._check_not_forgotten(p.chat_session(kind, job_input))
                    unstored += [key] if key is not None else []
            except IdempotencyConflict:
                raise BatchStopped(IdempotencyConflict(
                    "this Idempotency-Key stored another job at this place: a batch sent again "
                    "holds the same jobs in the same order; use a new key for a new batch"),
                    n, stored, True) from None
            except (UnknownKind, InvalidInput, BeingForgotten, StoreUnavailable) as exc:
                raise BatchStopped(exc, n, stored, idempotency_key is not None) from None
            checked.append((kind, job_input, timeout, launch, key))
        load = self.store.load(0.0)  # counted now, for all at once
        new = len(checked) - len(stored)
        try:
            if new:
                self._admit(load, new)
        except Overloaded:
            # Its own jobs, being stored by the same batch sent a moment before, are counted
            # twice: once that request is done, this one answers them.
            others = new - self._being_stored(unstored)
            if others < new and (not others or _fits(lambda: self._admit(load, others))):
                raise KeyInFlight("another request with this Idempotency-Key is still storing "
                                  "this batch; retry in a moment") from None
            raise
        return checked, load

    async def rerun(self, job_id: str, job_input: dict[str, Any] | None,
                    timeout_s: float | None, idempotency_key: str | None = None,
                    ) -> dict[str, Any]:
        """A new job of `job_id`'s kind with its input (or `job_input`) and its timeout
        (or `timeout_s`); the old job is left as it is."""
        old = await self.read(job_id)
        kind, error = old.get(p.F_KIND), old.get(p.F_ERROR)
        if not isinstance(kind, str) or (isinstance(error, dict)
                                         and error.get("type") == p.ErrorType.CORRUPT):
            raise NotRerunnable(f"job {job_id}'s file holds no job to run again; submit a "
                                "new one with POST /api/jobs")
        if old.get(p.F_STATE) not in p.FINAL_STATES:
            raise NotRerunnable(
                f"job {job_id} is {old.get(p.F_STATE)}: only a finished job (completed, "
                "failed, cancelled or timeout) runs again; cancel it first")
        if job_input is None:
            job_input = dict(old.get(p.F_INPUT) or {})
            job_input.pop("context", None)  # the expert's summary is made anew
        timeout = timeout_s or old.get(p.F_TIMEOUT_S)
        priority, attempts = old.get(p.F_PRIORITY), old.get(p.F_MAX_ATTEMPTS)
        launch = Launch(priority if isinstance(priority, int) else None, None,
                        attempts if isinstance(attempts, int) else None)
        return await self.submit(kind, job_input,
                                 timeout if isinstance(timeout, (int, float)) else None,
                                 idempotency_key, launch, {p.F_RERUN_OF: job_id})

    def _turn_lock(self, session: str) -> threading.Lock:
        return self._turn_locks[zlib.crc32(session.encode()) % len(self._turn_locks)]

    def _take_turn(self, session: str, job_input: dict[str, Any]) -> dict[str, Any]:
        """A chat's place in its session: after the session's newest job (the supervisor
        starts it once that one has ended), whose live answers `on_busy: interrupt` cancels."""
        newest, live = self.store.session_turn(session)
        if job_input.get("on_busy") == "interrupt":
            for job_id in live:
                with contextlib.suppress(JobNotFound):  # pruned meanwhile: nothing to stop
                    self.store.request_cancel(job_id)
                poke(self.store.dir, job_id)
        fields: dict[str, Any] = {p.F_AFTER: newest}
        if live:
            fields[p.F_PROGRESS] = {"fraction": None, "message": WAITING_TURN}
        return fields

    def _find(self, key: _Key) -> dict[str, Any] | Claim | None:
        """The job the key created; its claim if that job is not there; None if unclaimed."""
        try:
            claim = self.store.keys.read(key.name)
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the Idempotency-Key's record: {exc}") from exc
        if claim is None or claim.job_id is None:
            return claim
        if claim.fingerprint != key.fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request "
                "body; use a new key for a new job")
        try:
            return self.store.read(claim.job_id)
        except JobNotFound:
            return claim

    async def _unblock(self, key: _Key, claim: Claim, give_up_at: float) -> None:
        """A key whose job is not there: wait (without blocking) while its claimer may
        still be storing the job; after that its job was never stored or was deleted,
        and the key is released so that this request creates the job."""
        if time.monotonic() > give_up_at:
            raise KeyInFlight("another request with this Idempotency-Key is still storing "
                              "its job; retry in a moment")
        if claim.age_s < PENDING_S:
            await asyncio.sleep(KEY_POLL_S)
            return
        try:
            folder = self.store.path(claim.job_id).parent if claim.job_id else None
            await run_in_threadpool(self.store.keys.release, key.name, claim.job_id, folder)
        except OSError as exc:
            raise StoreUnavailable(f"cannot release the Idempotency-Key of a job that is "
                                   f"gone: {exc}") from exc

    def _being_stored(self, keys: list[_Key]) -> int:
        """How many of these keys another request claimed a moment ago, or stored since."""
        found = [self._find(key) for key in keys]
        return sum(isinstance(each, dict) or (each is not None and each.age_s < PENDING_S)
                   for each in found)

    def _check_not_forgotten(self, session: str | None) -> None:
        if session in self._forgetting:
            raise BeingForgotten("this conversation is being forgotten: start a new one "
                                 "(another session_id)")

    def _check_dependencies(self, launch: Launch) -> None:
        missing = [each for each in launch.depends_on if not self.store.path(each).exists()]
        if missing:
            raise InvalidInput(f"depends_on: no job {', '.join(missing[:5])}"
                               f"{' and more' if len(missing) > 5 else ''} (pruned, or never "
                               "submitted here): give the ids of jobs this server holds")

    def _admit(self, load: Load, jobs: int = 1) -> None:
        """Refuse `jobs` new ones beyond OFFLOAD_MAX_QUEUED queued, or beyond
        OFFLOAD_MAX_JOBS kept when not enough finished jobs may be pruned to make room.
        Admitted on the index snapshot's counts (several workers, or a burst within a
        snapshot, may overshoot a little); refused only on counts made now (see `submit`)."""
        settings = self.settings
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
        wait: float = RETRY_AFTER_S  # live jobs must finish first
        if len(load.finished) >= must_go:
            wait = load.finished[must_go - 1] + settings.min_retention_s - now
        raise Overloaded(
            f"{load.total} jobs are kept{these(load.total + jobs)} and OFFLOAD_MAX_JOBS "
            f"is {settings.max_jobs}, and {'none' if jobs == 1 else f'not {must_go}'} may be "
            "pruned to make room yet: a queued or running job never is, a "
            f"finished one only OFFLOAD_MIN_RETENTION_S ({settings.min_retention_s:g} s) "
            "after it finished, so that its result can be read. Retry after Retry-After "
            "seconds, or raise OFFLOAD_MAX_JOBS", wait)

    def _with_context(self, kind: str, job_input: dict[str, Any],
                      counts: dict[str, int]) -> dict[str, Any]:
        """A chat for the dashboard's expert gets a summary of the recent history."""
        if kind != "chat" or "context" in job_input or job_input.get("expert") is False:
            return job_input
        samples = self.metrics.read(CONTEXT_WINDOW_S) if self.metrics else []
        return {**job_input, "context": summary(samples, counts)}

    def session(self, session_id: str) -> list[dict[str, Any]]:
        """A chat session's turns, oldest first, from its jobs (kept until pruned)."""
        turns = []
        for job in self.store.session_jobs(session_id):
            if job.get(p.F_KIND) != "chat":
                continue
            messages = (job.get(p.F_INPUT) or {}).get("messages") or [{}]
            error = job.get(p.F_ERROR) or {}
            turns.append({"job_id": job[p.F_ID], "state": job.get(p.F_STATE),
                          "created_at": job.get(p.F_CREATED_AT),
                          "question": messages[-1].get("content"),
                          "reply": job.get(p.F_OUTPUT) or "",
                          "error": error.get("message")})
        return turns

    # -- read --------------------------------------------------------------------------

    async def get(self, job_id: str) -> dict[str, Any]:
        job = await self.read(job_id)
        if job.get(p.F_STATE) == p.JobState.QUEUED:
            # As fresh as /api/history: polling a queued job costs no pass over the queue.
            position = self.store.cached_queue_position(job_id, OVERVIEW_MAX_AGE_S)
            if position is None:  # the index's lock: a worker thread
                position = await run_in_threadpool(self.store.queue_position, job_id,
                                                   OVERVIEW_MAX_AGE_S)
            job[p.F_QUEUE_POSITION] = position
        return job

    async def read(self, job_id: str) -> dict[str, Any]:
        """The job file as it is now (see `SmallIO`)."""
        return await self.small_io.run("reading a job", self.store.read, job_id)

    async def list_jobs(self, state: str | None, kind: str | None, limit: int,
                        before: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the listing, and the `before` of the next one (None: none left)."""
        jobs = await run_in_threadpool(self.store.list_jobs, state, kind, limit + 1, 0.0,
                                       before)
        return jobs[:limit], (str(jobs[limit - 1][p.F_ID]) if len(jobs) > limit else None)

    async def counts(self) -> dict[str, int]:
        return (await self.overview(0))[1]

    async def overview(self, limit: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The newest jobs and the counts by state, from one look at the folder.

        A recent enough listing is summarised right here: no disk, and no hop to a
        worker thread, which under load can wait several milliseconds to be scheduled.
        """
        cached = self.store.cached_overview(limit, OVERVIEW_MAX_AGE_S)
        if cached is not None:
            return cached
        return await run_in_threadpool(self.store.overview, limit, OVERVIEW_MAX_AGE_S)

    async def log(self, job_id: str) -> str:
        return await run_in_threadpool(self._log, job_id)

    def _log(self, job_id: str) -> str:
        path = self.store.path(job_id)
        if not path.exists():
            raise JobNotFound(job_id)
        try:
            data, size = p.read_tail(p.sibling(path, p.LOG_FILE), LOG_MAX_BYTES)
        except FileNotFoundError:
            return ""
        except OSError as exc:  # a folder or a pipe in its place, a link: said, not a 500
            return f"[the job's log cannot be read: {exc.strerror or exc}]\n"
        text = data.decode("utf-8", errors="replace")
        return text if size <= LOG_MAX_BYTES else "[... earlier output cut ...]\n" + text

    # -- cancel ------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for the stop and wait (without blocking) until the job is final."""
        job = await run_in_threadpool(self.store.read, job_id)
        if job.get(p.F_STATE) in p.FINAL_STATES:
            raise AlreadyFinished(job)
        stopped = await self._stopped([job_id])
        if job_id not in stopped:  # deleted meanwhile
            raise JobNotFound(job_id)
        return stopped[job_id]

    async def _stopped(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Ask each job to stop, and wait (without blocking) until all are final or the
        stop's grace is over; each job as it is then (gone: left out)."""
        for job_id in job_ids:
            with contextlib.suppress(JobNotFound):  # deleted meanwhile: left out below
                await run_in_threadpool(self.store.request_cancel, job_id)
            poke(self.store.dir, job_id)
        deadline = time.monotonic() + self.settings.stop_grace_s + CANCEL_WAIT_S
        jobs: dict[str, dict[str, Any]] = {}
        while True:
            await asyncio.sleep(0.05)
            for job_id in job_ids:
                if jobs.get(job_id, {}).get(p.F_STATE) in p.FINAL_STATES:
                    continue  # final stays final: not read again
                with contextlib.suppress(JobNotFound):
                    jobs[job_id] = await run_in_threadpool(self.store.read, job_id)
            if time.monotonic() > deadline or all(
                    job.get(p.F_STATE) in p.FINAL_STATES for job in jobs.values()):
                return jobs

    async def remove(self, job_id: str) -> dict[str, Any]:
        """Delete a finished job now, with all it left (job file, log, records, its
        Idempotency-Key), as pruning would later; the job as it was."""
        job = await run_in_threadpool(self.store.read, job_id)
        state = job.get(p.F_STATE)
        if state not in p.FINAL_STATES:
            raise StillNeeded(f"job {job_id} is {state}: only a finished job is removed; "
                              "cancel it first")
        needing = await run_in_threadpool(self.store.needing, job_id)
        if needing:
            raise StillNeeded(
                f"job {job_id} is kept: {len(needing)} job(s) not ended need it "
                f"({', '.join(needing[:5])}): they depend on it, or are turns of its chat; "
                "remove it once they have ended, or cancel them first")
        problem = await run_in_threadpool(self.store.remove, job_id)
        if problem is not None:  # a file held open (Windows), say: not a full disk
            raise NotRemoved(f"job {job_id} could not be removed in full ({problem}); what "
                             "is left goes with another try, or with pruning")
        return job

    async def erase_session(self, session_id: str) -> tuple[int, list[str]]:
        """Forget a conversation: its turns still answering are stopped first, then every
        job of the session is deleted with all it left (job file, log, records, its
        Idempotency-Key). This worker takes no new turn of it meanwhile; one that another
        worker took is found by the next round. The number erased, and the turns still
        stopping (kept)."""
        with self._turn_lock(session_id):
            self._forgetting[session_id] += 1
        erased = 0
        try:
            for _ in range(ERASE_ROUNDS):
                jobs = await run_in_threadpool(self.store.session_jobs, session_id)
                if not jobs:
                    break
                live = [job[p.F_ID] for job in jobs if job.get(p.F_STATE) not in p.FINAL_STATES]
                now = await self._stopped(live) if live else {}
                stopping = [job_id for job_id, job in now.items()
                            if job.get(p.F_STATE) not in p.FINAL_STATES]
                for job in jobs:
                    if job[p.F_ID] not in stopping:
                        await run_in_threadpool(self.store.remove, job[p.F_ID])
                        erased += 1
                if stopping:
                    return erased, stopping
            return erased, []
        finally:
            with self._turn_lock(session_id):
                self._forgetting[session_id] -= 1
                if self._forgetting[session_id] <= 0:
                    del self._forgetting[session_id]


def _fits(admit: Callable[[], None]) -> bool:
    try:
        admit()
    except Overloaded:
        return False
    return True


def _fingerprint(kind: str, job_input: dict[str, Any], timeout_s: float, launch: Launch,
                 fields: dict[str, Any]) -> str:
    asked = [launch.priority, launch.max_attempts]
    start = [launch.start_at, launch.delay_s]  # as asked: a delay, not the time it gives
    body = json.dumps([kind, job_input, timeout_s, *(asked if any(
        each is not None for each in asked) else []), *(["start", *start] if any(
            each is not None for each in start) else []), *([fields] if fields else []),
        *(["depends_on", sorted(launch.depends_on)] if launch.depends_on else [])],
        sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()
