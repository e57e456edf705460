"""What the routes ask of the job system, with every disk touch in a worker thread but
a submission (its job file, its Idempotency-Key's file, the admission check against the
index snapshot) and a job's GET and event stream, which `SmallIO` runs on the event loop
while that stays quick.

Knows the store, the supervisor and idempotency; nothing of HTTP. Its parts have rooms of
their own: `admission`, `idempotency_keys`, `chat_turns`, `stops`, `small_io`.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from collections.abc import Collection
from typing import Any

from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.api.admission import Overloaded, admit, check_dependencies, fits
from jobs.api.chat_turns import BeingForgotten, ChatTurns
from jobs.api.history import MachineHistory, expert_context
from jobs.api.idempotency_keys import (
    KEY_WAIT_S,
    IdempotencyConflict,
    Key,
    KeyInFlight,
    KeyOfAnotherBatch,
    batch_jobs,
    batch_key_name,
    being_stored,
    find,
    fingerprints,
    made_by,
    unblock,
    unusable_keys,
    used_otherwise,
)
from jobs.api.small_io import SmallIO
from jobs.api.stops import Stops
from jobs.kinds import InvalidInput, Launch, UnknownKind, validate_input
from jobs.protocol.wake import poke
from jobs.settings import Settings
from jobs.store.dependency_lock import DependenciesBusy, dependencies_held
from jobs.store.idempotency import Claim, key_name
from jobs.store.index import Load
from jobs.store.job_store import JobNotFound, JobStore, StoreUnavailable

LOG_MAX_BYTES = 1_000_000  # /log returns at most the last megabyte
CONTEXT_WINDOW_S = 600.0  # the chat expert sees a summary of the last ten minutes
OVERVIEW_MAX_AGE_S = 0.25  # /api/history and /api/health may be this stale; a job read never
UNWRITABLE_SAID_S = 60.0  # a failed write is said by /api/health this long (or until one works)
LOW_DISK_BYTES = 8 << 20  # less free on the data folder's disk is said by /api/health


class NotRerunnable(Exception):
    """A job still queued or running was asked to run again."""


class BatchStopped(Exception):
    """A batch's job `at` was not stored (`cause`, answered as it would be alone); `stored`:
    the ids of those before it, which were."""

    def __init__(self, cause: Exception, at: int, stored: list[str], keyed: bool) -> None:
        super().__init__(f"jobs[{at}]: {cause}")
        self.cause, self.at, self.stored, self.keyed = cause, at, stored, keyed

    def what_was_stored(self) -> str:
        those = ("The job before it was" if len(self.stored) == 1
                 else f"The {len(self.stored)} before it were")
        if isinstance(self.cause, KeyOfAnotherBatch):  # those are that batch's, the same
            return "This request stored no job." + (
                f" {those} sent with that batch too (their ids are in `stored`)."
                if self.stored else "")
        if not self.stored:
            return "No job of the batch was stored."
        if not isinstance(self.cause, (StoreUnavailable, KeyInFlight, Overloaded)):
            return f"{those} stored (their ids are in `stored`), it and those after it not."
        again = ("send the batch again with the same Idempotency-Key to store the rest"
                 if self.keyed else "send only the rest again")
        return f"{those} stored (their ids are in `stored`): once it can be, {again}."


class JobService:
    def __init__(self, settings: Settings, store: JobStore,
                 history: MachineHistory | None = None) -> None:
        self.settings = settings
        self.store = store
        self.history = history
        self.small_io = SmallIO()
        self.stops = Stops(settings, store)
        self.turns = ChatTurns(store, self.stops)
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
        forgotten = self.store.forgotten_marks_problem()
        if forgotten is not None:
            problems.append(forgotten)
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
        key = None if idempotency_key is None else Key(
            key_name(idempotency_key), *fingerprints(kind, job_input, timeout, launch,
                                                     fields or {}, self.settings))
        fields = fields or {}
        give_up_at = time.monotonic() + KEY_WAIT_S
        while True:
            # On the event loop only with the index snapshot's counts: never wait for the
            # index lock there (nor for a session's newest job, counted now, nor for the
            # lock a job with dependencies is stored under).
            load = None if p.chat_session(kind, job_input) or launch.depends_on else (
                self.store.cached_load(OVERVIEW_MAX_AGE_S))
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
            await unblock(self.store, key, outcome, give_up_at)
        return outcome

    def _submit(self, kind: str, job_input: dict[str, Any], timeout_s: float,
                key: Key | None, load: Load | None,
                launch: Launch, fields: dict[str, Any]) -> dict[str, Any] | Claim:
        """The new job (`fields`: set in its file besides the input and `launch`); with a
        key, the job it already created, or its claim when that job is not there (see
        `idempotency_keys.unblock`). Without `load`, the jobs are counted now."""
        if key is not None and (found := find(self.store, key)) is not None:
            return found
        if load is None:
            load = self.store.load(0.0)
        admit(self.settings, load)
        # Checked and stored under the lock a removal takes: a job it depends on is not
        # removed between the look and the job's file (it would fail, told it was there).
        with (dependencies_held(self.store.dir.parent, "the job was not stored")
              if launch.depends_on else contextlib.nullcontext()):
            check_dependencies(self.store, launch)
            return self._store_new(kind, job_input, timeout_s, key, load, launch, fields)

    def _store_new(self, kind: str, job_input: dict[str, Any], timeout_s: float,
                   key: Key | None, load: Load, launch: Launch,
                   fields: dict[str, Any]) -> dict[str, Any] | Claim:
        job_input = self._with_context(kind, job_input, load.counts)
        session = p.chat_session(kind, job_input)
        with self.turns.lock(session) if session else contextlib.nullcontext():
            self.turns.check_not_forgotten(session, job_input)
            job_id = p.new_id()
            if key is not None:
                try:
                    claimed = self.store.keys.claim(key.name, job_id, key.fingerprint)
                except OSError as exc:
                    raise unusable_keys(self.store, "write", exc) from exc
                if not claimed:  # another request claimed it a moment ago
                    return find(self.store, key) or Claim(None, None, 0.0)
            created = time.time()  # stamped as its created_at; a delay_s counts from it
            fields = {**launch.fields(kind, self.settings, created), **fields}
            # Only once the key is ours: a retried request must not interrupt its original.
            if session:
                fields = {**fields, **self.turns.take(session, job_input)}
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
                    await unblock(self.store, key, outcome, give_up_at)
            except (StoreUnavailable, DependenciesBusy, KeyInFlight, IdempotencyConflict,
                    BeingForgotten, InvalidInput, Overloaded) as exc:
                raise BatchStopped(exc, n, [job[p.F_ID] for job in stored],
                                   idempotency_key is not None) from None
            stored.append(outcome)
        return stored

    def _check_batch(self, wanted: list[tuple[str, dict[str, Any], float | None, Launch]],
                     idempotency_key: str | None,
                     ) -> tuple[list[tuple[str, dict[str, Any], float, Launch, Key | None]], Load]:
        """Each job of a batch checked (its input, key, dependencies) and with its key;
        the counts it is admitted on. Raises, naming the first job that does not fit."""
        limit, name = min((self.settings.max_queued, "OFFLOAD_MAX_QUEUED"),
                          (self.settings.max_jobs, "OFFLOAD_MAX_JOBS"))
        if len(wanted) > limit:
            raise InvalidInput(f"{len(wanted)} jobs in one batch, and {name} is {limit}: send "
                               "at most that many at once")
        checked = []
        stored: list[str] = []  # by the batch sent before with this key
        unstored: list[Key] = []  # the keys of the others
        for n, (kind, job_input, timeout_s, launch) in enumerate(wanted):
            try:
                job_input = validate_input(kind, job_input)
                timeout = timeout_s or self.settings.job_timeout_s
                key = None if idempotency_key is None else Key(
                    batch_key_name(idempotency_key, n),
                    *fingerprints(kind, job_input, timeout, launch, {}, self.settings))
                found = None if key is None else find(self.store, key)
                if isinstance(found, dict):
                    stored.append(found[p.F_ID])
                else:
                    check_dependencies(self.store, launch)
                    self.turns.check_not_forgotten(p.chat_session(kind, job_input), job_input)
                    unstored += [key] if key is not None else []
            except IdempotencyConflict:
                assert idempotency_key is not None
                made = batch_jobs(self.store, idempotency_key)
                named = ", ".join(made[:5]) + (f" and {len(made) - 5} more" if len(made) > 5
                                                else "")
                raise BatchStopped(KeyOfAnotherBatch(
                    f"this Idempotency-Key was already used by another batch, which made "
                    f"{len(made)} job(s) ({named}), with another job at this place: a batch "
                    "sent again holds the same jobs in the same order; use a new key for a "
                    "new batch"), n, stored, True) from None
            except (UnknownKind, InvalidInput, BeingForgotten, StoreUnavailable) as exc:
                raise BatchStopped(exc, n, stored, idempotency_key is not None) from None
            checked.append((kind, job_input, timeout, launch, key))
        load = self.store.load(0.0)  # counted now, for all at once
        new = len(checked) - len(stored)
        try:
            if new:
                admit(self.settings, load, new)
        except Overloaded:
            # Its own jobs, being stored by the same batch sent a moment before, are counted
            # twice: once that request is done, this one answers them.
            others = new - being_stored(self.store, unstored)
            if others < new and (not others or fits(lambda: admit(self.settings, load, others))):
                raise KeyInFlight("another request with this Idempotency-Key is still storing "
                                  "this batch; retry in a moment") from None
            raise
        return checked, load

    async def rerun(self, job_id: str, job_input: dict[str, Any] | None,
                    timeout_s: float | None, idempotency_key: str | None = None,
                    ) -> dict[str, Any]:
        """A new job of `job_id`'s kind with its input (or `job_input`) and its timeout
        (or `timeout_s`); the old job is left as it is."""
        try:
            old = await self.read(job_id)
        except JobNotFound:
            # Sent again with its key after the old job was removed: the re-run it made.
            made = None if idempotency_key is None else await run_in_threadpool(
                made_by, self.store, idempotency_key)
            if made is None or made.get(p.F_RERUN_OF) != job_id:
                raise
            asked_otherwise = (
                job_input is not None and validate_input(str(made.get(p.F_KIND)), job_input)
                != made.get(p.F_INPUT)) or (timeout_s is not None
                                            and timeout_s != made.get(p.F_TIMEOUT_S))
            if asked_otherwise:  # what the key's record would say, had the old job been read
                raise used_otherwise(str(made[p.F_ID])) from None
            return made
        kind = old.get(p.F_KIND)
        if not isinstance(kind, str) or p.holds_no_job(old):
            raise NotRerunnable(f"job {job_id}'s file holds no job to run again; submit a "
                                "new one with POST /api/jobs")
        if old.get(p.F_STATE) not in p.FINAL_STATES:
            raise NotRerunnable(
                f"job {job_id} is {old.get(p.F_STATE)}: only a finished job (completed, "
                "failed, cancelled or timeout) runs again; cancel it first")
        await run_in_threadpool(self.turns.check_rerunnable, job_id)
        if job_input is None:
            job_input = dict(old.get(p.F_INPUT) or {})
            job_input.pop("context", None)  # the expert's summary is made anew
            job_input.pop("follows", None)  # and it follows the conversation as it is now
        timeout = timeout_s or old.get(p.F_TIMEOUT_S)
        priority, attempts = old.get(p.F_PRIORITY), old.get(p.F_MAX_ATTEMPTS)
        launch = Launch(priority if isinstance(priority, int) else None, None,
                        attempts if isinstance(attempts, int) else None)
        return await self.submit(kind, job_input,
                                 timeout if isinstance(timeout, (int, float)) else None,
                                 idempotency_key, launch, {p.F_RERUN_OF: job_id})

    def _with_context(self, kind: str, job_input: dict[str, Any],
                      counts: dict[str, int]) -> dict[str, Any]:
        """A chat for the dashboard's expert gets a summary of the recent history."""
        if kind != "chat" or "context" in job_input or job_input.get("expert") is False:
            return job_input
        samples = self.history.read(CONTEXT_WINDOW_S) if self.history else []
        return {**job_input, "context": expert_context(samples, counts)}

    # -- read --------------------------------------------------------------------------

    async def get(self, job_id: str) -> dict[str, Any]:
        job = await self.read(job_id)
        if job.get(p.F_STATE) == p.JobState.QUEUED:
            # As fresh as /api/history: polling a queued job costs no pass over the queue.
            place = self.store.cached_queue_place(job_id, OVERVIEW_MAX_AGE_S)
            if place is None:  # the index's lock: a worker thread
                place = await run_in_threadpool(self.store.queue_place, job_id,
                                                OVERVIEW_MAX_AGE_S)
            job[p.F_QUEUE_POSITION], job[p.F_WAITS_FOR] = place
        return job

    async def read(self, job_id: str) -> dict[str, Any]:
        """The job file as it is now (see `SmallIO`)."""
        return await self.small_io.run("reading a job", self.store.read, job_id)

    async def list_jobs(self, states: Collection[str], kinds: Collection[str], limit: int,
                        before: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the listing (in any of `states`, of any of `kinds`; none: all), and
        the `before` of the next one (None: none left)."""
        jobs = await run_in_threadpool(self.store.list_jobs, states, kinds, limit + 1, 0.0,
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

    # -- stop, remove, forget ------------------------------------------------------------

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.stops.cancel(job_id)

    async def cancel_many(self, job_ids: list[str]
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        return await self.stops.cancel_many(job_ids)

    async def remove(self, job_id: str) -> dict[str, Any]:
        return await self.stops.remove(job_id)

    def session(self, session_id: str) -> list[dict[str, Any]]:
        return self.turns.listing(session_id)

    def chat_of_key(self, idempotency_key: str) -> dict[str, Any] | None:
        """The chat a request with this Idempotency-Key stored, if there is one."""
        job = made_by(self.store, idempotency_key)
        return job if job is not None and job.get(p.F_KIND) == "chat" else None

    async def erase_session(self, session_id: str) -> tuple[int, list[str]]:
        return await self.turns.erase(session_id)
