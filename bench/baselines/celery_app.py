"""Celery on Redis (broker and result backend) with a no-op task, for bench/http.py; its
worker loads `app` here."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-untyped]  # celery ships no type hints

URL_ENV = "OFFLOAD_BENCH_REDIS_URL"


def noop() -> bool:
    return True


def connect(url: str) -> tuple[Celery, Any]:
    """The Celery app on the Redis at `url` and its no-op task (named the same in every
    process)."""
    app = Celery("offload-bench", broker=url, backend=url)
    app.conf.broker_connection_retry_on_startup = True  # and no warning that it will
    return app, app.task(name=f"{__name__}.noop")(noop)


def __getattr__(name: str) -> Any:
    # Built on demand from the environment: importing this module connects to nothing.
    if name == "app":
        return connect(os.environ[URL_ENV])[0]
    raise AttributeError(name)
