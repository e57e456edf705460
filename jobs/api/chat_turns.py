"""A conversation's turns in order: each chat is stored to start after the one before it
in its session (`on_busy: interrupt` stops that one), and a conversation being erased
takes no new turn until every erasure has ended, nor one forgotten ever again."""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections import Counter
from typing import Any

from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.api.stops import Stops
from jobs.protocol.wake import poke
from jobs.store.job_store import JobNotFound, JobStore, StoreUnavailable

TURN_LOCKS = 64
WAITING_TURN = "waits for the previous answer in its conversation"
ERASE_ROUNDS = 3  # a conversation's turns listed, stopped and deleted again, at most


class BeingForgotten(Exception):
    """A turn sent to a conversation while it is being forgotten."""


class TurnGone(BeingForgotten):
    """A turn sent after a turn of a forgotten conversation (or of another one)."""


class ChatTurns:
    def __init__(self, store: JobStore, stops: Stops) -> None:
        self.store = store
        self._stops = stops
        # A chat session's newest job is looked up and the next one stored under one of
        # these (picked by the session): two submissions of one session through this
        # worker never both follow the same job, and other sessions seldom wait.
        self._locks = [threading.Lock() for _ in range(TURN_LOCKS)]
        # Sessions being erased, by how many erasures run: no new turn until all have ended.
        self._forgetting: Counter[str] = Counter()

    def lock(self, session: str) -> threading.Lock:
        return self._locks[zlib.crc32(session.encode()) % len(self._locks)]

    def check_not_forgotten(self, session: str | None, job_input: dict[str, Any]) -> None:
        """Neither being forgotten, nor forgotten (its session id is never taken again), nor
        following a turn of a forgotten conversation (`follows`): such a turn would store
        the forgotten ones again, in its messages."""
        if session in self._forgetting:
            raise BeingForgotten("this conversation is being forgotten: start a new one "
                                 "(another session_id)")
        if session is None:
            return
        follows = job_input.get("follows")
        if isinstance(follows, str):
            self._check_follows(session, follows)
        if self.store.is_session_forgotten(session):
            raise TurnGone("this conversation was forgotten, and its session_id with it: "
                           "start a new one (another session_id) without its turns")

    def _check_follows(self, session: str, follows: str) -> None:
        """The turn a question follows is of its conversation, and not forgotten. A turn
        that is gone while others of its conversation are not forgotten was removed by
        hand: the conversation goes on."""
        try:
            turn = self.store.read(follows)
        except JobNotFound:
            if any(not self.store.is_forgotten(job[p.F_ID])
                   for job in self.store.session_jobs(session)):
                return
            raise TurnGone(f"this conversation was forgotten, or all its turns removed (the "
                           f"turn this question follows, {follows}, is gone): start a new "
                           "one (another session_id) without its turns") from None
        if p.chat_session(turn.get(p.F_KIND), turn.get(p.F_INPUT)) != session:
            raise TurnGone(f"the turn this question follows ({follows}) is not of this "
                           "conversation: start a new one (another session_id) without its "
                           "turns")
        if self.store.is_forgotten(follows):
            raise TurnGone(f"this conversation was forgotten (the turn this question "
                           f"follows, {follows}, waits to be erased): start a new one "
                           "(another session_id) without its turns")

    def check_rerunnable(self, job_id: str) -> None:
        """A turn a forget kept does not run again: its messages carry the forgotten turns."""
        if self.store.is_forgotten(job_id):
            raise BeingForgotten(f"job {job_id} is a turn of a forgotten conversation, kept "
                                 "until it is erased: it does not run again. Ask in a new "
                                 "conversation (another session_id)")

    def take(self, session: str, job_input: dict[str, Any]) -> dict[str, Any]:
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

    def listing(self, session_id: str) -> list[dict[str, Any]]:
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

    async def erase(self, session_id: str) -> tuple[int, list[str]]:
        """Forget a conversation: its session id is marked as forgotten (no worker takes a
        question under it from then on, after a restart too), every job of the session is
        marked, its turns still answering are stopped, then every job of the session is
        deleted with all it left (job file, log, records, its Idempotency-Key). This worker
        takes no new turn of it meanwhile; one that another worker took before the mark is
        found by the next round. The number erased, and the turns still stopping (kept,
        marked). On a full disk those stopping are not waited for (their final state
        waits for room): the others are erased, and the error says so."""
        with self.lock(session_id):
            self._forgetting[session_id] += 1
        try:
            try:
                await run_in_threadpool(self.store.mark_session_forgotten, session_id)
                marked = True
            except StoreUnavailable:  # no room even for an empty file: once turns are erased
                marked = False
            erased, stopping = await self._erase_turns(session_id)
            if not marked:
                await run_in_threadpool(self.store.mark_session_forgotten, session_id)
            return erased, stopping
        finally:
            with self.lock(session_id):
                self._forgetting[session_id] -= 1
                if self._forgetting[session_id] <= 0:
                    del self._forgetting[session_id]

    async def _erase_turns(self, session_id: str) -> tuple[int, list[str]]:
        erased = 0
        for _ in range(ERASE_ROUNDS):
            jobs = await run_in_threadpool(self.store.session_jobs, session_id)
            if not jobs:
                break
            # Marked first: a turn kept (still stopping, or no room to erase it) is
            # known to be forgotten, and no question that follows it is taken.
            for job in jobs:
                await run_in_threadpool(self.store.mark_forgotten, job[p.F_ID])
            live = [job[p.F_ID] for job in jobs if job.get(p.F_STATE) not in p.FINAL_STATES]
            now, no_room = await self._stops.stopped(live) if live else ({}, None)
            stopping = [job_id for job_id, job in now.items()
                        if job.get(p.F_STATE) not in p.FINAL_STATES]
            for job in jobs:
                if job[p.F_ID] not in stopping:
                    await run_in_threadpool(self.store.remove, job[p.F_ID],
                                            now.get(job[p.F_ID], job))
                    erased += 1
            if stopping and no_room is not None:
                raise StoreUnavailable(
                    "no room on the data folder's disk for the final state of "
                    f"{_turns(len(stopping))} still answering",
                    f"{_turns(erased)} erased; those answering are stopped all the "
                    "same (a queued one does not start, a running one's runner is "
                    "stopped) and kept until the conversation is forgotten again once "
                    "there is room", no_room=True)
            if stopping:
                return erased, stopping
        return erased, []


def _turns(count: int) -> str:
    return f"{count} turn{'' if count == 1 else 's'}"
