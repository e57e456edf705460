"""Huey on SQLite with a no-op task, for bench/http.py; its consumer loads `huey` here."""

from __future__ import annotations

import os
from typing import Any

from huey import SqliteHuey  # type: ignore[import-untyped]  # huey ships no type hints

DB_ENV = "OFFLOAD_BENCH_HUEY_DB"


def noop() -> bool:
    return True  # not None: a pending result reads as None


def connect(filename: str) -> tuple[SqliteHuey, Any]:
    """The Huey app on `filename` and its no-op task (named the same in every process)."""
    app = SqliteHuey("offload-bench", filename=filename)
    return app, app.task()(noop)


def __getattr__(name: str) -> Any:
    # Built on demand from the environment: importing this module creates no database.
    if name == "huey":
        return connect(os.environ[DB_ENV])[0]
    raise AttributeError(name)
