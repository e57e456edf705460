"""A listing's jobs without their bulky parts (`GET /api/jobs?fields=summary`): what a
table of jobs shows, a few hundred bytes a job, whatever its input, output or result.

Fifty chats of long conversations listed in full were 45 MB a poll, for a table that
shows a few short columns; the one job needed in full is `GET /api/jobs/{id}`.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from jobs import protocol as p

F_INPUT_PREVIEW = "input_preview"
INPUT_PREVIEW_CHARS = 200
# Left out of a summary: each can be megabytes (`result` keeps its `usage`, below).
BULKY = frozenset({p.F_INPUT, p.F_OUTPUT, p.F_RESULT, "loss_curve"})
USAGE = "usage"  # a chat's token counts: the jobs table's tokens column


class Fields(str, Enum):
    """What a listing gives of each job."""

    FULL = "full"
    SUMMARY = "summary"


def summary(job: dict[str, Any]) -> dict[str, Any]:
    """The job without its input, output, result and loss curve: its input's start in
    `input_preview`, and of its result only the `usage` (a new dict: `job` may be the
    index's own)."""
    brief = {key: value for key, value in job.items() if key not in BULKY}
    result = job.get(p.F_RESULT)
    if isinstance(result, dict) and USAGE in result:
        brief[p.F_RESULT] = {USAGE: result[USAGE]}
    brief[F_INPUT_PREVIEW] = input_preview(job.get(p.F_INPUT))
    return brief


def input_preview(job_input: Any) -> str | None:
    """The input as compact JSON, its first INPUT_PREVIEW_CHARS characters ("…" when
    cut); only that start is written, however large the input."""
    if job_input is None:
        return None
    text = json.dumps(_start(job_input, [INPUT_PREVIEW_CHARS]), ensure_ascii=False,
                      separators=(",", ":"))
    return text if len(text) <= INPUT_PREVIEW_CHARS else text[:INPUT_PREVIEW_CHARS - 1] + "…"


def _start(value: Any, room: list[int]) -> Any:
    """`value` cut where `room` characters of its JSON are spent. Each part spends no more
    than its JSON's length, so a value cut anywhere writes more than the room: the caller
    sees it cut by its length alone. A container spends one: nesting stays within room."""
    if isinstance(value, str):  # its quotes spend too: a run of "" ends as others do
        kept = value[:max(room[0], 0)]
        room[0] -= len(kept) + 2
        return kept
    room[0] -= 1
    if isinstance(value, dict):
        kept_items: dict[Any, Any] = {}
        for key, item in value.items():
            if room[0] <= 0:
                break
            room[0] -= len(str(key)) + 3
            kept_items[key] = _start(item, room)
        return kept_items
    if isinstance(value, list):
        kept_list: list[Any] = []
        for item in value:
            if room[0] <= 0:
                break
            kept_list.append(_start(item, room))
        return kept_list
    return value  # a number, true, false or null
