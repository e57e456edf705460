"""What the index keeps of chats: each session's turns (which is newest, which are
live), and the tokens the completed chats used, for /metrics."""

from __future__ import annotations

import time
from typing import Any

from jobs import protocol as p
from jobs.store.entries import Entry


class SessionTurns:
    """Each chat session's newest job (by submission) and its queued or running ones."""

    def __init__(self) -> None:
        self._newest: dict[str, tuple[tuple[int, str], str]] = {}
        self._live: dict[str, set[str]] = {}

    def newest(self, session: str) -> str | None:
        newest = self._newest.get(session)
        return newest[1] if newest else None

    def live(self, session: str) -> set[str]:
        return self._live.get(session, set())

    def track(self, job_id: str, entry: Entry, key: tuple[int, str]) -> None:
        session = entry.session
        assert session is not None
        live = self._live.setdefault(session, set())
        if entry.state in p.FINAL_STATES:
            live.discard(job_id)
        else:
            live.add(job_id)
        if not live:
            del self._live[session]
        newest = self._newest.get(session)
        if newest is None or newest[0] <= key:
            self._newest[session] = (key, job_id)

    def untrack(self, job_id: str, entry: Entry) -> None:
        session = entry.session
        if session is None:
            return
        live = self._live.get(session)
        if live is not None:
            live.discard(job_id)
            if not live:
                del self._live[session]
        newest = self._newest.get(session)
        if newest is not None and newest[1] == job_id:
            del self._newest[session]  # its earlier jobs, if any, are older still


class TokenTotals:
    """The tokens of the chats that completed since this index began, each counted
    once (its id kept while its job is); never lowered, not even by pruning."""

    def __init__(self) -> None:
        self._since = time.time() - 0.001  # finish times are rounded to the millisecond
        self._usage = dict.fromkeys(("chats", "prompt_tokens", "completion_tokens"), 0)
        self._counted: set[str] = set()

    def totals(self) -> dict[str, Any]:
        return {"since": p.iso(self._since), **self._usage}

    def seen(self, job_id: str, entry: Entry, data: dict[str, Any]) -> None:
        """A job read: counted if it is a chat completed since, not counted before."""
        if (entry.state == p.JobState.COMPLETED and entry.kind == "chat"
                and entry.finished_ts >= self._since and job_id not in self._counted):
            self._count(job_id, data)

    def forget(self, job_id: str) -> None:
        """Its job is gone: never seen again."""
        self._counted.discard(job_id)

    def _count(self, job_id: str, data: dict[str, Any]) -> None:
        self._counted.add(job_id)
        result = data.get(p.F_RESULT)
        usage = result.get("usage") if isinstance(result, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        totals = dict(self._usage)  # replaced whole: `totals` reads it unlocked
        totals["chats"] += 1
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                totals[key] += usage[key]
        self._usage = totals
