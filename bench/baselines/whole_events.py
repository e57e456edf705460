"""Baseline: Offload's API with `/events` as it was before events carried what changed,
every event the whole job (its input included), for `python -m bench events`."""

from __future__ import annotations

from typing import Any

from api_entry import app
from jobs.api import routes_jobs
from jobs.api.events import first_event


def _whole_job(old_job: dict[str, Any], new_job: dict[str, Any]) -> str | None:
    return None if old_job == new_job else first_event(new_job, None)


# What streams send after their first event.
routes_jobs.change_event = _whole_job  # type: ignore[attr-defined]
__all__ = ["app"]
