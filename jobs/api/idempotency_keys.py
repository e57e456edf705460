"""A submission's Idempotency-Key as the API uses it: the fingerprint of the request, the
job the key already made, and the wait while another request stores that job. The key's
file is `jobs.store.idempotency`'s."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.kinds import Launch, input_filled
from jobs.settings import MAX_BATCH, Settings
from jobs.store.idempotency import PENDING_S, Claim, key_name
from jobs.store.job_store import JobNotFound, JobStore, StoreUnavailable

KEY_POLL_S = 0.05  # how often a request waits on a key whose job is being stored
KEY_WAIT_S = 3 * PENDING_S  # and gives up after this long (a claim that never ages)


class IdempotencyConflict(ValueError):
    pass


class KeyOfAnotherBatch(IdempotencyConflict):
    """A batch's key that made another batch's jobs: this batch was stored in no part."""


class KeyInFlight(Exception):
    """Another request with the same Idempotency-Key is still storing its job."""


@dataclass(frozen=True)
class Key:
    name: str  # the key file's name: a hash of the key, which is never stored
    fingerprint: str  # of the request's body
    earlier: str  # the same, as versions before 0.10 made it: a key they claimed names it


def fingerprints(kind: str, job_input: dict[str, Any], timeout_s: float, launch: Launch,
                 fields: dict[str, Any], settings: Settings) -> tuple[str, str]:
    """Of what the request asks, a default the same whether sent or left out; and of what
    it sent, as versions before 0.10 made it (`Key.earlier`)."""
    defaults = Launch().fields(kind, settings, 0)
    asked = [None if launch.priority == defaults[p.F_PRIORITY] else launch.priority,
             None if launch.max_attempts == defaults[p.F_MAX_ATTEMPTS] else launch.max_attempts]
    at_once = replace(launch, delay_s=launch.delay_s or None)  # a delay of 0 is none
    return (_hash(kind, input_filled(kind, job_input), timeout_s, asked, at_once, fields),
            _hash(kind, job_input, timeout_s, [launch.priority, launch.max_attempts], launch,
                  fields))


def _hash(kind: str, job_input: dict[str, Any], timeout_s: float, asked: list[int | None],
          launch: Launch, fields: dict[str, Any]) -> str:
    start = [launch.start_at, launch.delay_s]  # as asked: a delay, not the time it gives
    body = json.dumps([kind, job_input, timeout_s, *(asked if any(
        each is not None for each in asked) else []), *(["start", *start] if any(
            each is not None for each in start) else []), *([fields] if fields else []),
        *(["depends_on", sorted(launch.depends_on)] if launch.depends_on else [])],
        sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def _claim(store: JobStore, name: str) -> Claim | None:
    try:
        return store.keys.read(name)
    except OSError as exc:
        raise unusable_keys(store, "read", exc) from exc


def unusable_keys(store: JobStore, doing: str, exc: OSError) -> StoreUnavailable:
    """An Idempotency-Key's record that cannot be read or written, said with its folder
    (a client that sent no key of its own, as `offload submit`, knows of no key)."""
    folder = store.keys.folder
    misplaced = p.files.file_in_the_way(folder)
    return StoreUnavailable(
        f"cannot {doing} the Idempotency-Key's record in {folder}: {exc.strerror or exc}"
        + ("" if misplaced is None else f" (move away the file at {misplaced})"))


def find(store: JobStore, key: Key) -> dict[str, Any] | Claim | None:
    """The job the key created; its claim if that job is not there; None if unclaimed."""
    claim = _claim(store, key.name)
    if claim is None or claim.job_id is None:
        return claim
    if claim.fingerprint not in (key.fingerprint, key.earlier):
        raise used_otherwise(claim.job_id)
    try:
        return store.read(claim.job_id)
    except JobNotFound:
        return claim


def used_otherwise(job_id: str) -> IdempotencyConflict:
    """A key sent again with another body than the one that made job `job_id`."""
    return IdempotencyConflict(f"this Idempotency-Key was already used with a different "
                               f"request body, for job {job_id}; use a new key for a new job")


def made_by(store: JobStore, idempotency_key: str) -> dict[str, Any] | None:
    """The job a request with this key stored; None while there is none (never sent,
    still being stored, or removed since)."""
    claim = _claim(store, key_name(idempotency_key))
    if claim is None or claim.job_id is None:
        return None
    try:
        return store.read(claim.job_id)
    except JobNotFound:
        return None


async def unblock(store: JobStore, key: Key, claim: Claim, give_up_at: float) -> None:
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
        folder = store.path(claim.job_id).parent if claim.job_id else None
        await run_in_threadpool(store.keys.release, key.name, claim.job_id, folder)
    except OSError as exc:
        raise StoreUnavailable(f"cannot release the Idempotency-Key of a job that is "
                               f"gone: {exc}") from exc


def batch_jobs(store: JobStore, idempotency_key: str) -> list[str]:
    """The jobs a batch sent with this key made, in its order, up to the first place whose
    job is gone (removed, pruned) or was never stored."""
    made = []
    for n in range(MAX_BATCH):
        claim = store.keys.read(batch_key_name(idempotency_key, n))
        if claim is None or claim.job_id is None:
            break
        made.append(claim.job_id)
    return made


def batch_key_name(idempotency_key: str, n: int) -> str:
    """The key of a batch's job at place `n`."""
    return key_name(f"{idempotency_key}\0{n}")  # no header holds a NUL: no key's twin


def being_stored(store: JobStore, keys: list[Key]) -> int:
    """How many of these keys another request claimed a moment ago, or stored since."""
    found = [find(store, key) for key in keys]
    return sum(isinstance(each, dict) or (each is not None and each.age_s < PENDING_S)
               for each in found)
