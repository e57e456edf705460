"""The job-file protocol: what every process of Offload shares. Standard library only
(an import contract in pyproject.toml checks it): runners import this package and
nothing else of `jobs`, so they start fast. States, error types, field names and file
names live here, once; the package's modules hold the rest that processes share:
`remote` (a job on another machine), `wake` (the supervisor's files), `embedded` (the
embedded model's server), `urls` (credentials in OPENAI_BASE_URL).

Each job has a folder of its own, `<data>/jobs/<id>/`:
  job.json   the job (state, progress, output, result); one writer at a time
  job.log    the runner's stdout and stderr
  stop.json  a stop request: {"reason": "cancelled" | "timeout"}; written by the API
             or the supervisor, read by the runner when it is signalled
  run.json   the launch record: {"pid": ..., "create_time": ...}; written by the
             supervisor only, so an adopting supervisor knows what was launched

A folder per job, not all files in one: every atomic write renames inside the folder
it writes, and a rename locks its folder, so listing one shared folder waits for the
renames of low-priority runners (docs/architecture.md has the figures).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import sys
import time
from enum import Enum

# Runners import this module: no typing, pathlib, re or datetime at run time (each costs
# start-up milliseconds in every subprocess).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    StrPath: TypeAlias = str | os.PathLike[str]

class JobState(str, Enum):
    """Where a job is; the last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    def __str__(self) -> str:  # the value, in f-strings and logs, as in the job file
        return str(self.value)


class ErrorType(str, Enum):
    """Why a job did not complete: `error.type` in the job file."""

    LOST = "lost"  # its runner died without writing a final state
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    PROVIDER = "provider"  # the LLM server refused, failed or could not be reached
    RUNNER = "runner"  # the runner itself failed (bad input, an exception)
    CORRUPT = "corrupt"  # the job file does not hold a job
    DEPENDENCY = "dependency"  # the job it depends on ended without completing

    def __str__(self) -> str:
        return str(self.value)


FINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                          JobState.TIMEOUT})


def deadline_message(timeout_s: object) -> str:
    """`error.message` of a job stopped at its deadline (`timeout_s` as its job file has it)."""
    return f"stopped after its deadline of {timeout_s} s"


def stop_error(reason: str, timeout_s: object) -> dict[str, str]:
    """`error` of a job stopped for `reason`: its deadline (TIMEOUT), else a cancel."""
    if reason == JobState.TIMEOUT:
        return {"type": ErrorType.TIMEOUT, "message": deadline_message(timeout_s)}
    return {"type": ErrorType.CANCELLED, "message": "cancelled on request"}


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
F_LAUNCHER = "launcher"  # where it ran: "local" or "ray"
F_HOST = "host"  # the machine the runner ran on
F_AFTER = "after"  # a chat: the earlier job of its session, to end before this one starts
F_RERUN_OF = "rerun_of"  # the job this one runs again (POST /api/jobs/{id}/rerun)
F_DEPENDS_ON = "depends_on"  # [ids]: starts once they all completed; fails if one ends otherwise
F_PRIORITY = "priority"  # higher starts first; FIFO within one priority
F_RUN_AT = "run_at"  # queued until then (ISO 8601 UTC); a retry's backoff sets it too
F_ATTEMPT = "attempt"  # 1-based; absent means 1
F_MAX_ATTEMPTS = "max_attempts"  # absent means 1: a failure is final
F_EARLIER_ERRORS = "earlier_errors"  # [{"attempt", "type", "message", "finished_at"}]
F_SCHEDULE = "schedule"  # the name of the schedule that created it (jobs/schedules.py)

JOB_FIELDS = (
    F_ID, F_KIND, F_STATE, F_CREATED_AT, F_STARTED_AT, F_FINISHED_AT, F_TIMEOUT_S,
    F_QUEUE_POSITION, F_PROGRESS, F_OUTPUT, F_RESULT, F_ERROR, F_PID, F_EXIT_CODE,
    F_RESOURCES, F_INPUT, F_CREATED_NS, F_LAUNCHER, F_HOST, F_AFTER, F_RERUN_OF, F_PRIORITY,
    F_RUN_AT, F_ATTEMPT, F_MAX_ATTEMPTS, F_EARLIER_ERRORS, F_SCHEDULE, F_DEPENDS_ON,
)

# A runner's exit code after a transient failure with attempts left: it recorded the error
# in a job file it left `running`, and the supervisor queues the job again.
EXIT_RETRY = 75  # EX_TEMPFAIL

JOB_FILE = "job.json"
LOG_FILE = "job.log"
STOP_FILE = "stop.json"
RUN_FILE = "run.json"

LOCAL = "local"
RAY = "ray"
TMP_SUFFIX = ".tmp"

# The project's folder (the one holding jobs/ and runners/): where its processes start.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
# fsync of creations, final states and claims. For benchmarks and tests only:
# OFFLOAD_FSYNC=0 gives up the guarantee that a 202 survives a power loss.
FSYNC = os.environ.get("OFFLOAD_FSYNC", "1") != "0"
# Set by a launcher that puts a runner's claim on disk itself: DURABLE once it has, or
# the number of a pipe on which it writes DURABLE_WORD when it has (closed: do it yourself).
CLAIM_WORD_ENV = "OFFLOAD_CLAIM_WORD"
DURABLE = "durable"
DURABLE_WORD = f"{DURABLE}\n".encode()
CLAIM_WORD_TIMEOUT_S = 5.0  # then the runner syncs its claim itself

_HEX = frozenset("0123456789abcdef")
_REPLACE_RETRY_S = 1.0  # Windows: a reader holding the file makes os.replace fail briefly
_READ_RETRIES = 5


class CorruptJobFile(Exception):
    """A job file exists but does not hold a JSON object."""


def new_id() -> str:
    """32 lowercase hex characters, random (a uuid4)."""
    import uuid

    return uuid.uuid4().hex


def is_valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and _HEX.issuperset(job_id)


def chat_session(kind: object, job_input: object) -> str | None:
    """The chat session a job is a turn of (one answer at a time in each), or None: only
    a chat's non-empty `session_id` makes one."""
    session = job_input.get("session_id") if isinstance(job_input, dict) else None
    return session if kind == "chat" and isinstance(session, str) and session else None


_last_ns = 0


def unique_ns() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process."""
    global _last_ns
    _last_ns = max(time.time_ns(), _last_ns + 1)
    return _last_ns


def iso(timestamp: float) -> str:
    """A POSIX timestamp as ISO 8601 UTC with milliseconds: 2026-01-31T12:00:00.123Z."""
    whole = int(timestamp)
    millis = min(999, int(round((timestamp - whole) * 1000)))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def now_iso() -> str:
    return iso(time.time())


def parse_iso(value: str) -> float:
    """ISO 8601 (as written by `iso`) to a POSIX timestamp."""
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def job_path(jobs_folder: StrPath, job_id: str) -> str:
    """`<jobs>/<id>/job.json`; raises ValueError for anything that is not a job id."""
    if not is_valid_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return os.path.join(jobs_folder, job_id, JOB_FILE)


def metrics_file(data_dir: StrPath) -> str:
    """The machine metrics the supervisor records and the dashboard and training read."""
    return os.path.join(data_dir, "history", "metrics.jsonl")


def sibling(job_file: StrPath, name: str) -> str:
    """The log, stop or run file that belongs to a job file."""
    return os.path.join(os.path.dirname(os.fspath(job_file)), name)


def id_of(job_file: StrPath) -> str:
    return os.path.basename(os.path.dirname(os.path.abspath(job_file)))


def new_job(job_id: str, kind: str, job_input: dict[str, Any], timeout_s: float,
            created: float | None = None) -> dict[str, Any]:
    """`created`: a POSIX time, by default now."""
    job: dict[str, Any] = dict.fromkeys(JOB_FIELDS)
    job.update({
        F_ID: job_id, F_KIND: kind, F_STATE: JobState.QUEUED,
        F_CREATED_AT: iso(time.time() if created is None else created),
        F_TIMEOUT_S: timeout_s, F_INPUT: job_input, F_OUTPUT: "", F_CREATED_NS: unique_ns(),
        F_PRIORITY: 0, F_ATTEMPT: 1,
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


QueueKey = tuple[int, int, str]  # (-priority, created_ns, id)


def queue_key(job: dict[str, Any]) -> QueueKey:
    """Launch order among due jobs: higher priority first, then submission order."""
    priority = job.get(F_PRIORITY)
    created, job_id = fifo_key(job)
    return (-priority if isinstance(priority, int) else 0, created, job_id)


def dependencies(job: dict[str, Any]) -> tuple[str, ...]:
    """The jobs a job waits for, each once: its `depends_on` list (or one id, as a job
    file may say it)."""
    value = job.get(F_DEPENDS_ON)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(dict.fromkeys(each for each in value if isinstance(each, str)))
    return ()


def run_at(job: dict[str, Any]) -> float | None:
    """When a queued job may start (a POSIX time), or None: at once."""
    value = job.get(F_RUN_AT)
    if not isinstance(value, str):
        return None
    try:
        return parse_iso(value)
    except ValueError:
        return None


def attempts(job: dict[str, Any]) -> tuple[int, int]:
    """(this attempt, the most it may have), both at least 1."""
    attempt, most = job.get(F_ATTEMPT), job.get(F_MAX_ATTEMPTS)
    attempt = attempt if isinstance(attempt, int) and attempt > 0 else 1
    return attempt, most if isinstance(most, int) and most > 0 else 1


# An event's output (docs/contract.md, "Events"): appended to the client's copy; F_OUTPUT
# in an event replaces it.
OUTPUT_DELTA = "output_delta"


def event_id(job: dict[str, Any]) -> str:
    """The id of the event that leaves a client with `job`: the length of its output,
    after its attempt and a dot from the second attempt on (2.40); a client resumes there."""
    attempt, size = attempts(job)[0], len(job.get(F_OUTPUT) or "")
    return f"{attempt}.{size}" if attempt > 1 else str(size)


def output_change(old: dict[str, Any], new: dict[str, Any]) -> dict[str, str]:
    """How `new`'s output reaches a client holding `old`'s: nothing if it is the same,
    what was appended (OUTPUT_DELTA), else in full (F_OUTPUT: another attempt began, or
    it was not an append)."""
    before, after = str(old.get(F_OUTPUT) or ""), str(new.get(F_OUTPUT) or "")
    if attempts(old)[0] != attempts(new)[0] or not after.startswith(before):
        return {F_OUTPUT: after}
    return {OUTPUT_DELTA: after[len(before):]} if after != before else {}


_SURROGATE = re.compile("[\ud800-\udfff]")


def readable(text: str) -> str:
    """`text` with surrogate halves joined into their characters, and a half alone as
    U+FFFD: JSON escapes can carry halves (a model server's `\\ud83d`), UTF-8 cannot."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


MAX_DEPTH = 64  # of arrays and objects in a job's input (pydantic answers go to ~250)


def json_problem(value: Any, limit: int = MAX_DEPTH, depth_only: bool = False) -> str | None:
    """What keeps `value` from being a job's plain JSON, or None: nesting beyond `limit`;
    unless `depth_only` (a runner's result may hold a NaN loss, shown as null), a number
    that is not finite or a string with a surrogate half."""
    level = [value]
    for _ in range(limit + 1):
        deeper = []
        for item in level:
            if isinstance(item, dict):
                deeper += [*item, *item.values()]
            elif isinstance(item, list):
                deeper += item
            elif depth_only:
                continue
            elif isinstance(item, float) and not math.isfinite(item):
                return f"{item} is not a JSON number"
            elif isinstance(item, str) and _SURROGATE.search(item) is not None:
                return "a string holds half of a surrogate pair (not text)"
        if not deeper:
            return None
        level = deeper
    return f"nested more than {limit} levels deep"


def write_json(path: StrPath, data: dict[str, Any], durable: bool = False,
               sync_folder: bool = True) -> None:
    """Atomically replace `path`: a reader sees the old file or the new one, never half.
    `durable`: on disk before this returns (see `write_atomic`)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    try:
        payload = text.encode()
    except UnicodeEncodeError:  # a surrogate half: written readable rather than lost
        payload = readable(text).encode()
    write_atomic(path, payload, durable, sync_folder)


def write_atomic(path: StrPath, payload: bytes, durable: bool = False,
                 sync_folder: bool = True) -> None:
    """Write a temp file in the same folder, then replace `path` with it.

    `durable` (a job's creation, its final state, a claim): the temp file is
    fsync'd before the rename, so a power loss leaves the old file or the whole new one,
    never an empty one; the folder is fsync'd after it (unless `sync_folder` is False:
    the caller does it), so the rename itself survives.
    """
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}")
    durable = durable and FSYNC
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())  # Windows: FlushFileBuffers
        _replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or already renamed
        raise
    if durable and sync_folder:
        sync_dir(folder)


def sync_claim(job_file: StrPath) -> None:
    """Put the job's claim (its `run.json`, when it has one) on disk, with its name in the
    job's folder: a runner does so before it runs anything of its job, so a power cut
    before then leaves no claim, and a job that never ran runs after the restart. A
    runner whose launcher syncs the claim while it starts waits for its word instead."""
    word = os.environ.pop(CLAIM_WORD_ENV, None)  # the runner's children never see it
    run_file = sibling(job_file, RUN_FILE)
    try:
        fd = os.open(run_file, os.O_RDWR | getattr(os, "O_BINARY", 0)) if FSYNC else -1
    except FileNotFoundError:
        fd = -1  # not launched by a supervisor (a job file run by hand)
    if fd < 0:
        _said_durable(word, listen=False)
        return
    try:
        if _said_durable(word):
            return
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(os.path.dirname(run_file))


def _said_durable(word: str | None, listen: bool = True) -> bool:
    """Whether the launcher says (or, given the pipe `word` names, will say) that this
    runner's claim is on disk: then the runner's own fsyncs would only flush the disk
    again. The pipe is closed either way."""
    if word is None or word == DURABLE:
        return word == DURABLE
    try:
        fd = int(word)
    except ValueError:
        return False
    heard = b""
    try:
        if not listen or sys.platform == "win32":
            return False
        import select  # Linux's fork server only, where it is loaded already

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + CLAIM_WORD_TIMEOUT_S
        while not heard.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return False
            chunk = os.read(fd, len(DURABLE_WORD) - len(heard))
            if not chunk:
                return False  # closed unsaid: the launcher could not sync it
            heard += chunk
        return heard == DURABLE_WORD
    except OSError:
        return False
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # not ours after all


def sync_dir(folder: StrPath) -> None:
    """fsync a folder, so the names just created or renamed in it survive a power loss.
    POSIX only: Windows cannot open a folder for it (os.open refuses folders there)."""
    if os.name != "posix" or not FSYNC:
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a file system that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _replace(src: StrPath, dst: StrPath) -> None:
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


def read_json(path: StrPath) -> dict[str, Any] | None:
    """Read a JSON object; None when the file does not exist.

    Retries briefly on the transient failures of a concurrent replace (Windows denies
    access for a moment); a file that stays unreadable raises `CorruptJobFile`.
    """
    last_error: Exception | None = None
    for attempt in range(_READ_RETRIES):
        try:
            raw = _read_file(path)
        except (FileNotFoundError, NotADirectoryError):  # no folder there, or a file
            return None
        except PermissionError as exc:
            last_error = exc
        else:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                last_error = exc
            except RecursionError:  # arrays in arrays, thousands deep: no job's
                raise CorruptJobFile(f"{os.path.basename(path)}: nested too deeply") from None
            else:
                if isinstance(data, dict):
                    # A half of a pair alone (`\ud800`, by hand) cannot be sent on as UTF-8.
                    return _readable_all(data) if _HALF_ESCAPE.search(raw) else data
                last_error = ValueError("not a JSON object")
        time.sleep(0.002 * (attempt + 1))
    raise CorruptJobFile(f"{os.path.basename(path)}: {last_error}")


# What `read_json` raises for a link that loops or a socket: no file behind the name,
# however often it is tried (out of file handles, say, it may be there next time). A
# reader that must list every job takes these as a damaged file; the counters' reader
# does not (zeros would read as a reset).
NO_FILE_TO_READ = frozenset({errno.ELOOP, errno.ENXIO})


_HALF_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's escape of a surrogate half


def _readable_all(value: Any) -> Any:
    """`value` with every string in it `readable`."""
    if isinstance(value, str):
        return readable(value)
    if isinstance(value, list):
        return [_readable_all(each) for each in value]
    if isinstance(value, dict):
        return {readable(key): _readable_all(each) for key, each in value.items()}
    return value


def _read_file(path: StrPath) -> bytes:
    """A regular file's bytes. Opened without blocking and looked at first: a pipe put
    in a file's place would hold its reader for good."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a pipe or a device"
            raise CorruptJobFile(f"{os.path.basename(path)}: {kind}, not a file")
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        return f.read()


def read_json_or_none(path: StrPath) -> dict[str, Any] | None:
    """`read_json`, with a file that stays unreadable taken as missing."""
    try:
        return read_json(path)
    except CorruptJobFile:
        return None


def request_stop(job_file: StrPath, reason: str) -> None:
    """Leave a stop request for a runner (or a queued job) to find."""
    write_json(sibling(job_file, STOP_FILE), {"reason": reason, "at": now_iso()})


def stop_reason(job_file: StrPath) -> str | None:
    try:
        data = read_json(sibling(job_file, STOP_FILE))
    except CorruptJobFile:
        return JobState.CANCELLED
    if data is None:
        return None
    reason = data.get("reason")
    return reason if reason in (JobState.CANCELLED, JobState.TIMEOUT) else JobState.CANCELLED


def log_tail(job_file: StrPath, max_lines: int = 20, max_bytes: int = 4096) -> str:
    """The last lines of a job's log, for error messages."""
    try:
        data, _ = read_tail(sibling(job_file, LOG_FILE), max_bytes)
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-max_lines:])


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not through a link put in a log's place


def read_tail(path: StrPath, max_bytes: int) -> tuple[bytes, int]:
    """The last `max_bytes` of a file and its size. Opened without waiting and without
    following a link, and a file only: a pipe in a log's place held its reader for good."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | NO_FOLLOW | getattr(os, "O_BINARY", 0)
    with open(os.open(path, flags), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a file (a folder, a pipe or a device)")
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        return f.read(), size


def open_log(path: StrPath) -> int:
    """A job's log, opened to append to (made 0600), never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | NO_FOLLOW | getattr(os, "O_BINARY", 0)
    return os.open(path, flags, 0o600)


def cap_log(path: StrPath, max_bytes: int) -> int:
    """Shrink a log over `max_bytes` in place to its head, a note of what was dropped,
    and its latest output; returns the bytes dropped. The runner appends (O_APPEND), so
    it goes on writing at the new end; what it writes during the cut may be lost."""
    try:
        size = os.path.getsize(path)
        if size <= max_bytes:
            return 0
        head, tail = max_bytes // 4, max_bytes // 2
        with open(os.open(path, os.O_RDWR | NO_FOLLOW), "r+b") as f:
            f.seek(max(head, size - tail))
            kept = f.read()
            note = (f"\n[... log capped at {max_bytes} bytes: older output dropped, its start "
                    f"and its latest output kept ...]\n").encode()
            f.seek(head)
            f.write(note)
            f.write(kept)
            f.truncate()
            dropped = size - head - len(kept)
    except OSError:
        return 0
    return dropped
