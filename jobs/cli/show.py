"""What people read: tables, a job in full, times, and text made safe for a terminal."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import IO, Any

from jobs import protocol as p
from jobs.protocol import trust

CHAT = "chat"  # the kind the embedded model answers, no more at once than its slots
# `/api/queue`'s `model_engine` for a model of one slot, and what gives it more.
ONE_SLOT_ENGINE = "llama-cpp-python"
ONE_SLOT = ("llama-cpp-python's server has one slot, whatever OFFLOAD_LLM_SLOTS says; "
            "llama-server has more: `python launch.py --reinstall` builds it, and Offload "
            "runs it once restarted with OFFLOAD_LLM_ENGINE unset")
REMOVED_SAID = "removed after it ended, before it was read"


def when(value: object) -> str:
    """'2026-01-31T12:00:00.123Z' -> '2026-01-31 12:00:00' (UTC, as the API gives it)."""
    return str(value)[:19].replace("T", " ") if value else "-"


def utc(value: object) -> str:
    """`when`, said to be UTC: a reader's own zone is not the API's."""
    return f"{when(value)} UTC" if value else when(value)


def _took(job: dict[str, Any]) -> str:
    started = job.get(p.F_STARTED_AT)
    if not started:
        return "-"
    finished = job.get(p.F_FINISHED_AT)
    end = p.parse_iso(str(finished)) if finished else time.time()
    return f"{max(0.0, end - p.parse_iso(str(started))):.1f}s"


def removed(job_id: str) -> dict[str, Any]:
    """What a wait shows of a job removed (or pruned) after it ended, before it was read:
    its id, its state unknown."""
    return {p.F_ID: job_id, p.F_STATE: None, "removed": True}


def is_removed(job: dict[str, Any]) -> bool:
    """Whether `job` is what `removed` gives, not a job as the server answers it."""
    return job.get("removed") is True


def waits_for(job: dict[str, Any]) -> dict[str, Any]:
    """Why a queued job has not started, as the server says it (empty from an older
    server, which says none)."""
    waits = job.get(p.F_WAITS_FOR)
    return waits if isinstance(waits, dict) else {}


def start_ahead(job: dict[str, Any]) -> str | None:
    """When a queued job given a later start (`--delay`, `--at`) starts, if still ahead."""
    start_at = p.run_at(job)
    if start_at is None or start_at <= time.time():
        return None
    return utc(p.iso(start_at))


def note(job: dict[str, Any]) -> str:
    """What to know of a job at a glance: its error, progress, or why it has not started
    (as the server says it: `waits_for`)."""
    if is_removed(job):
        return REMOVED_SAID
    error = job.get(p.F_ERROR)
    if isinstance(error, dict) and error.get("message"):
        return f"{error.get('type')}: {error['message']}"
    queued = job.get(p.F_STATE) == p.JobState.QUEUED
    retry = queued and p.attempts(job)[0] > 1
    progress = job.get(p.F_PROGRESS)
    # A retry's "retrying in N s" was true when it was written: its run_at says when.
    if isinstance(progress, dict) and not retry:
        fraction = progress.get("fraction")
        percent = f"{fraction:.0%} " if isinstance(fraction, (int, float)) else ""
        return f"{percent}{progress.get('message') or ''}".strip()
    if not queued:
        return ""
    waits = waits_for(job)
    reason, starts = waits.get(p.WAITS_REASON), start_ahead(job)
    if reason in (p.F_DEPENDS_ON, p.F_AFTER):
        awaited = [str(each) for each in waits.get("jobs") or []]
        return (f"after {awaited[0][:8]}" if len(awaited) == 1
                else f"after {len(awaited)} jobs")
    if starts is not None and retry:
        earlier = job.get(p.F_EARLIER_ERRORS)
        last = earlier[-1] if isinstance(earlier, list) and earlier else None
        failed = (f" (after {last.get('type')}: {last.get('message')})"
                  if isinstance(last, dict) and last.get("message") else "")
        return f"retrying: starts {starts}{failed}"
    if starts is not None:
        return f"starts {starts}"
    if reason == p.WAITS_KIND_CAP:
        cap, kind = waits.get(p.WAITS_KIND_CAP), job.get(p.F_KIND)
        return _held(cap, waits, f"kind {kind} at its cap {cap}", f"kind {kind}'s cap {cap}")
    if reason == p.WAITS_MODEL_SLOTS:
        slots = waits.get(p.WAITS_MODEL_SLOTS)
        plural = "" if slots == 1 else "s"
        if waits.get(p.WAITS_KIND_CAP) is not None:  # the chats' own cap, as low
            both = f"kind {job.get(p.F_KIND)}'s cap {slots} and the model's {slots} slot{plural}"
            return _held(slots, waits, f"{both} busy", both)
        model = f"the embedded model's {slots} slot{plural}"
        return _held(slots, waits, f"{model} busy", model)
    position = job.get(p.F_QUEUE_POSITION)
    return "" if position is None else f"{position} ahead in the queue"


def _held(cap: Any, waits: dict[str, Any], full: str, room_of: str) -> str:
    """A cap holding a job back (a kind's, or the embedded model's slots for a chat): `full`
    with jobs running, or to be by those queued before it (`room_of` the cap's name)."""
    running = waits.get("running")
    if not isinstance(cap, int) or not isinstance(running, int) or running >= cap:
        return f"held: {full}"
    running_said = f"{running} running, " if running else ""
    return f"held: {room_of} ({running_said}{cap - running} queued before it)"


def remedy(job: dict[str, Any], engine: str | None = None) -> str:
    """What gives a held job room: a higher cap of its kind, more of the model's slots,
    or both where both hold it. `engine`: the model's (`/api/queue`'s `model_engine`)."""
    waits = waits_for(job)
    raise_cap = f"offload parallel N --kind {job.get(p.F_KIND)}"
    if waits.get(p.WAITS_REASON) != p.WAITS_MODEL_SLOTS:
        return raise_cap
    both = waits.get(p.WAITS_KIND_CAP) is not None
    if engine == ONE_SLOT_ENGINE:  # no cap raised starts another chat there
        return (f"its kind's cap and the model's one slot both hold it: {ONE_SLOT}; and "
                f"{raise_cap} raises the cap") if both else ONE_SLOT
    if both:
        return (f"its kind's cap and the model's slots both hold it: raise both, with "
                f"{raise_cap} and OFFLOAD_LLM_SLOTS")
    return "each chat takes one of the model's slots; OFFLOAD_LLM_SLOTS sets how many"


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def table(rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write(shown("  ".join(cells).rstrip() + "\n", out))


def job_table(jobs: list[dict[str, Any]], out: IO[str]) -> None:
    if not jobs:
        out.write("no jobs\n")
        return
    rows = [["ID", "KIND", "STATE", "CREATED (UTC)", "TOOK", "NOTE"]]
    rows += [[str(job.get(p.F_ID)), str(job.get(p.F_KIND, "-")),
              str(job.get(p.F_STATE) or "unknown"),
              when(job.get(p.F_CREATED_AT)), _took(job), _one_line(note(job), 60)]
             for job in jobs]
    table(rows, out)


def job_details(job: dict[str, Any], out: IO[str], engine: str | None = None) -> None:
    """`engine`: the embedded model's (`/api/queue`'s `model_engine`), for a held chat."""
    def compact(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = [("id", job.get(p.F_ID)), ("kind", job.get(p.F_KIND)), ("state", job.get(p.F_STATE)),
             ("created", utc(job.get(p.F_CREATED_AT))),
             ("started", utc(job.get(p.F_STARTED_AT))),
             ("finished", utc(job.get(p.F_FINISHED_AT))), ("took", _took(job)),
             ("timeout", f"{job.get(p.F_TIMEOUT_S)}s")]
    queued = job.get(p.F_STATE) == p.JobState.QUEUED
    for name in ("queue_position", "attempt", "max_attempts", "priority", "run_at", "schedule",
                 "depends_on", "rerun_of", "after", "launcher", "host", "exit_code"):
        if name == "run_at" and not queued:
            continue  # when a queued job starts (a retry's backoff left it in the file)
        if name == "depends_on" and job.get(name) is not None:
            lines.append(("depends on", ", ".join(p.dependencies(job))))
        elif job.get(name) is not None:  # a start as the times above it
            lines.append((name.replace("_", " "), utc(job[name]) if name == "run_at"
                          else job[name]))
    if job.get(p.F_ERROR) or (job.get(p.F_PROGRESS) and not queued):
        lines.append(("error" if job.get(p.F_ERROR) else "progress", note(job)))
    elif queued:
        lines += _why_queued(job, engine)
    for earlier in job.get(p.F_EARLIER_ERRORS) or []:
        lines.append((f"attempt {earlier.get('attempt')}",
                      f"{earlier.get('type')}: {earlier.get('message')}"))
    lines.append(("input", compact(job.get(p.F_INPUT))))
    if job.get(p.F_RESULT) is not None:
        lines.append(("result", compact(job[p.F_RESULT])))
    for name, value in lines:
        out.write(shown(f"{name + ':':<16}{value}\n", out))
    if job.get(p.F_OUTPUT):
        out.write(shown(f"output:\n{job[p.F_OUTPUT]}\n", out))


def _why_queued(job: dict[str, Any], engine: str | None) -> list[tuple[str, str]]:
    """`show`'s lines for a queued job that a kind's cap or other jobs hold back."""
    said = note(job)
    if said.startswith("held: "):
        return [("held", f"{said.removeprefix('held: ')} (starts when one of them ends; "
                         f"{remedy(job, engine)})")]
    if said.startswith("after "):  # in full: the ids to look at
        return [("waits for", ", ".join(map(str, job[p.F_WAITS_FOR].get("jobs") or [])))]
    return []


# Control characters but tab and newline, and the marks that turn the direction of the
# text around (U+202E shows "exe.txt" as "txt.exe"). A carriage return goes back over what
# the line showed ("FAILED\rOK    "): written out but before a newline (Windows' line end).
_CONTROL = f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{trust.DIRECTION_MARKS}]"
_SHOWN_ALONE = re.compile(f"{_CONTROL}|\r(?!\n)")
_SHOWN_ALONE_BUT_CR = re.compile(_CONTROL)


def shown(text: str, stream: IO[str], progress_bars: bool = False) -> str:
    """`text` for `stream`: on a terminal, control characters written out (`\\x1b`), as
    a model's reply or a job's log can hold escape sequences that retitle the window or
    clear the screen; into a file or a pipe, as it is. `progress_bars`: a runner's own
    output, whose carriage returns redraw its progress line."""
    if not stream.isatty():
        return text
    found = _SHOWN_ALONE_BUT_CR if progress_bars else _SHOWN_ALONE
    return found.sub(trust.written_out, text)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def kind_caps_said(queue: dict[str, Any]) -> list[str]:
    """A line for each kind with a cap of its own: its cap, and where it comes from; and
    the chats the embedded model decodes at once, where that holds them back."""
    caps, defaults = queue.get("kind_caps") or {}, queue.get("kind_caps_default") or {}
    slots, chat_cap = queue.get("model_slots"), caps.get(CHAT)
    lines = []
    # Under a chat cap below them the slots hold no chat back: that cap alone is said.
    if (isinstance(slots, int) and slots < queue.get("max_concurrent", 0)
            and not (isinstance(chat_cap, int) and chat_cap < slots)):
        why = ("llama-cpp-python's server runs one chat at a time" if queue.get(
            "model_engine") == ONE_SLOT_ENGINE else
               "the embedded model's slots (OFFLOAD_LLM_SLOTS)")
        lines.append(f"{CHAT} at once: at most {slots}, {why}; more wait queued")
    for kind, cap in sorted(caps.items()):
        if kind not in (queue.get("kind_caps_set") or []):
            lines.append(f"{kind} at once: {cap} (OFFLOAD_KIND_CAPS)")
        else:
            default = defaults.get(kind)
            lines.append(f"{kind} at once: {cap} (set while running, kept across restarts; "
                         + (f"OFFLOAD_KIND_CAPS says {default})" if default is not None
                            else "without it, no cap of its own)"))
    return lines


def cap_said(queue: dict[str, Any]) -> str:
    said = f"runners at once: {queue['max_concurrent']}"
    if not queue.get("max_concurrent_set"):
        return f"{said} (OFFLOAD_MAX_CONCURRENT)"
    return (f"{said} (set while running, kept across restarts; OFFLOAD_MAX_CONCURRENT is "
            f"{queue['max_concurrent_default']})")
