"""The job-file protocol, shared by the API and the runners.

Standard library only: runners import this module and nothing else of `jobs`, so
they start fast. Field names, state names and file names live here, once.

A job's files, all in one folder:
  <id>.json  the job (state, progress, output, result); one writer at a time
  <id>.log   the runner's stdout and stderr
  <id>.stop  a stop request: {"reason": "cancelled" | "timeout"}; written by the API
             or the supervisor, read by the runner when it is signalled
  <id>.run   the launch record: {"pid": ..., "create_time": ...}; written by the
             supervisor only, so an adopting supervisor knows what was launched
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# States (the API's `JobState` enum mirrors these strings).
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TIMEOUT = "timeout"
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT})
STATES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT)

# Error types.
ERR_LOST = "lost"
ERR_TIMEOUT = "timeout"
ERR_CANCELLED = "cancelled"
ERR_PROVIDER = "provider"
ERR_RUNNER = "runner"
ERR_CORRUPT = "corrupt"

# Field names of a job file.
F_ID = "id"
F_KIND = "kind"
F_STATE = "state"
F_CREATED_AT = "created_at"
F_STARTED_AT = "started_at"
F_FINISHED_AT = "finished_at"
F_TIMEOUT_S = "timeout_s"
F_QUEUE_POSITION = "queue_position"
F_PROGRESS = "progress"
F_OUTPUT = "output"
F_RESULT = "result"
F_ERROR = "error"
F_PID = "pid"
F_EXIT_CODE = "exit_code"
F_RESOURCES = "resources"
F_INPUT = "input"
F_CREATED_NS = "created_ns"  # FIFO order; created_at has only millisecond resolution

JOB_FIELDS = (
    F_ID, F_KIND, F_STATE, F_CREATED_AT, F_STARTED_AT, F_FINISHED_AT, F_TIMEOUT_S,
    F_QUEUE_POSITION, F_PROGRESS, F_OUTPUT, F_RESULT, F_ERROR, F_PID, F_EXIT_CODE,
    F_RESOURCES, F_INPUT, F_CREATED_NS,
)

JOB_SUFFIX = ".json"
LOG_SUFFIX = ".log"
STOP_SUFFIX = ".stop"
RUN_SUFFIX = ".run"
TMP_SUFFIX = ".tmp"

_ID_RE = re.compile(r"[0-9a-f]{32}")
_REPLACE_RETRY_S = 1.0  # Windows: a reader holding the file makes os.replace fail briefly
_READ_RETRIES = 5


class CorruptJobFile(Exception):
    """A job file exists but does not hold a JSON object."""


def is_valid_id(job_id: str) -> bool:
    return _ID_RE.fullmatch(job_id) is not None


_last_ns = 0


def unique_ns() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process."""
    global _last_ns
    _last_ns = max(time.time_ns(), _last_ns + 1)
    return _last_ns


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> float:
    """ISO 8601 (as written by `now_iso`) to a POSIX timestamp."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def jobs_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "jobs"


def job_path(folder: Path, job_id: str) -> Path:
    if not is_valid_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return folder / f"{job_id}{JOB_SUFFIX}"


def sibling(job_file: Path, suffix: str) -> Path:
    """The log, stop or run file that belongs to a job file."""
    return job_file.with_suffix(suffix)


def id_of(job_file: Path) -> str:
    return job_file.stem


def new_job(job_id: str, kind: str, job_input: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    job: dict[str, Any] = dict.fromkeys(JOB_FIELDS)
    job.update({
        F_ID: job_id, F_KIND: kind, F_STATE: QUEUED, F_CREATED_AT: now_iso(),
        F_TIMEOUT_S: timeout_s, F_INPUT: job_input, F_OUTPUT: "", F_CREATED_NS: unique_ns(),
    })
    return job


def fifo_key(job: dict[str, Any]) -> tuple[int, str]:
    """Submission order: by creation time, ties broken by id."""
    created = job.get(F_CREATED_NS)
    if not isinstance(created, int):
        try:
            created = int(parse_iso(str(job.get(F_CREATED_AT))) * 1e9)
        except ValueError:
            created = 0
    return (created, str(job.get(F_ID)))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace `path`: a reader sees the old file or the new one, never half."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        _replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or already renamed
        raise


def _replace(src: Path, dst: Path) -> None:
    deadline = time.monotonic() + _REPLACE_RETRY_S
    delay = 0.001
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            # Windows: the destination is open in a reader for a moment; try again.
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON object; None when the file does not exist.

    Retries briefly on the transient failures of a concurrent replace (Windows denies
    access for a moment); a file that stays unreadable raises `CorruptJobFile`.
    """
    last_error: Exception | None = None
    for attempt in range(_READ_RETRIES):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            last_error = exc
        else:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                last_error = exc
            else:
                if isinstance(data, dict):
                    return data
                last_error = ValueError("not a JSON object")
        time.sleep(0.002 * (attempt + 1))
    raise CorruptJobFile(f"{path.name}: {last_error}")


def request_stop(job_file: Path, reason: str) -> None:
    """Leave a stop request for a runner (or a queued job) to find."""
    write_json(sibling(job_file, STOP_SUFFIX), {"reason": reason, "at": now_iso()})


def stop_reason(job_file: Path) -> str | None:
    try:
        data = read_json(sibling(job_file, STOP_SUFFIX))
    except CorruptJobFile:
        return CANCELLED
    if data is None:
        return None
    reason = data.get("reason")
    return reason if reason in (CANCELLED, TIMEOUT) else CANCELLED


def log_tail(job_file: Path, max_lines: int = 20, max_bytes: int = 4096) -> str:
    """The last lines of a job's log, for error messages."""
    try:
        with open(sibling(job_file, LOG_SUFFIX), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-max_lines:])
