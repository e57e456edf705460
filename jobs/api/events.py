"""What `/events` sends: the job in full once, then what changed; ids to resume from.

An event's `id` is the length of the job's output (in Unicode code points) that a client
holds once it has applied the event. A runner only ever appends to its output, so a
client that comes back with `Last-Event-ID: n` is missing exactly `output[n:]`; the other
fields it may have missed are small, and a resume sends them all again. Events that
change only those fields keep the id of the one before them.

A job that is retried starts its output again: from its second attempt on, an id is
`<attempt>.<length>`, and a resume from another attempt's id gets the job in full, as does
a client following the job when a new attempt begins.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic_core import to_json

from jobs import protocol as p
from jobs.models import Job

_POSITION = re.compile(r"(?:([2-9]|[1-9][0-9]{1,5})\.)?([0-9]{1,15})")  # attempt 2 on
BAD_POSITION = ("Last-Event-ID (or ?after=) must be the id of an event of this stream: a "
                "whole number, the length of output already received (after the attempt "
                "and a dot for a retried job: 2.40). Leave it out to get the job in full.")


class BadPosition(ValueError):
    pass


class Position(int):
    """Where a client resumes: the length of output it holds, of the attempt it saw."""

    attempt = 1


def public(job: dict[str, Any]) -> dict[str, Any]:
    """The job as the API shows it (every field present, null when unset)."""
    return Job.model_validate(job).model_dump(mode="json")


def resume_position(last_event_id: str | None, after: str | None) -> Position | None:
    """Where a client resumes from; the header wins, since EventSource sends a newer one
    on each reconnection while its URL stays the same."""
    given = last_event_id if last_event_id else after
    if not given:
        return None
    match = _POSITION.fullmatch(given.strip())
    if not match:
        raise BadPosition(BAD_POSITION)
    position = Position(match.group(2))
    position.attempt = int(match.group(1) or 1)
    return position


def first_event(job: dict[str, Any], position: int | None) -> str:
    """Every field; the output in full, or from `position` when that is a position of it
    (beyond its end, the output was started again: the client's copy is replaced)."""
    output = job.get(p.F_OUTPUT) or ""
    if (position is None or position > len(output)
            or getattr(position, "attempt", 1) != p.attempts(job)[0]):
        return _event(job, job)
    fields = {key: value for key, value in job.items() if key != p.F_OUTPUT}
    fields[p.OUTPUT_DELTA] = output[position:]
    return _event(job, fields)


def change_event(old_job: dict[str, Any], new_job: dict[str, Any]) -> str | None:
    """The fields that differ from `old_job` to `new_job` and the output appended between
    them; None when nothing differs. A new attempt sends the job in full."""
    if p.attempts(old_job)[0] != p.attempts(new_job)[0]:
        return first_event(new_job, None)
    fields = {key: value for key, value in new_job.items()
              if key != p.F_OUTPUT and old_job.get(key) != value}
    fields.update(p.output_change(old_job, new_job))  # in full if not an append (run by hand)
    if not fields:
        return None
    return _event(new_job, fields)


def _event(job: dict[str, Any], fields: dict[str, Any]) -> str:
    """An event of `fields` that leaves the client with `job`."""
    data = to_json(fields, inf_nan_mode="null").decode()  # NaN is no JSON: null, as a GET has
    return f"id: {p.event_id(job)}\ndata: {data}\n\n"
