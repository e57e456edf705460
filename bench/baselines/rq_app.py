"""RQ's no-op task for bench/http.py; the work-horse each job forks imports `noop` here."""

from __future__ import annotations

from redis import Redis
from rq import Queue

QUEUE = "offload-bench"


def noop() -> bool:
    return True  # not None: a pending job's return value reads as None


def connect(url: str) -> Queue:
    """The queue on the Redis at `url` that the bench's workers listen on."""
    return Queue(QUEUE, connection=Redis.from_url(url))
