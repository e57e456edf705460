"""What `/events` sends: the job in full once, then what changed; ids to resume from.

An event's `id` is the length of the job's output (in Unicode code points) that a client
holds once it has applied the event. A runner only ever appends to its output, so a
client that comes back with `Last-Event-ID: n` is missing exactly `output[n:]`; the other
fields it may have missed are small, and a resume sends them all again. Events that
change only those fields keep the id of the one before them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jobs.models import Job

OUTPUT = "output"  # the whole output: it replaces the client's copy
OUTPUT_DELTA = "output_delta"  # appended to the client's copy
_POSITION = re.compile(r"[0-9]{1,15}")
BAD_POSITION = ("Last-Event-ID (or ?after=) must be the id of an event of this stream: a "
                "whole number, the length of output already received. Leave it out to get "
                "the job in full.")


class BadPosition(ValueError):
    pass


def public(job: dict[str, Any]) -> dict[str, Any]:
    """The job as the API shows it (every field present, null when unset)."""
    return Job.model_validate(job).model_dump(mode="json")


def resume_position(last_event_id: str | None, after: str | None) -> int | None:
    """Where a client resumes from; the header wins, since EventSource sends a newer one
    on each reconnection while its URL stays the same."""
    given = last_event_id if last_event_id else after
    if not given:
        return None
    given = given.strip()
    if not _POSITION.fullmatch(given):
        raise BadPosition(BAD_POSITION)
    return int(given)


def first_event(job: dict[str, Any], position: int | None) -> str:
    """Every field; the output in full, or from `position` when that is a position of it
    (beyond its end, the output was started again: the client's copy is replaced)."""
    output = job.get(OUTPUT) or ""
    if position is None or position > len(output):
        return _event(len(output), job)
    fields = {key: value for key, value in job.items() if key != OUTPUT}
    fields[OUTPUT_DELTA] = output[position:]
    return _event(len(output), fields)


def change_event(old_job: dict[str, Any], new_job: dict[str, Any]) -> str | None:
    """The fields that differ from `old_job` to `new_job` and the output appended between
    them; None when nothing differs."""
    fields = {key: value for key, value in new_job.items()
              if key != OUTPUT and old_job.get(key) != value}
    old, new = old_job.get(OUTPUT) or "", new_job.get(OUTPUT) or ""
    if new != old:
        if new.startswith(old):
            fields[OUTPUT_DELTA] = new[len(old):]
        else:  # not an append (a job run again by hand): send it all
            fields[OUTPUT] = new
    if not fields:
        return None
    return _event(len(new), fields)


def _event(position: int, fields: dict[str, Any]) -> str:
    return f"id: {position}\ndata: {json.dumps(fields, ensure_ascii=False)}\n\n"
