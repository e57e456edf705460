"""The job-file protocol: what every process of Offload shares. Standard library only
(an import contract in pyproject.toml checks it), but python-dotenv where `trust` reads a
`.env`: runners import this package and nothing else of `jobs`, so they start fast.
States, error types, field names and file names live here, once; the package's modules
hold the rest that processes share: `files` (how every shared file is written and read),
`remote` (a job on another machine), `wake` (the supervisor's files), `embedded` (the
embedded model's server), `urls` (credentials in OPENAI_BASE_URL), `control` (the
queue's pause and caps), `counters` (the counts for /metrics), `trust` (whose files are
safe to read).

Each job has a folder of its own, `<data>/jobs/<id>/`:
  job.json   the job (state, progress, output, result); one writer at a time
  job.log    the runner's stdout and stderr
  stop.json  a stop request: {"reason": "cancelled" | "timeout", "at": ...}, or empty: a
             cancel that found no room for more; written by the API or the supervisor,
             read by the runner when it is signalled
  run.json   the claim, then the launch record: the runner's pid and create time, the
             launching supervisor's identity, when it was launched; written by the
             supervisor only, so an adopting supervisor knows what was launched
  forgotten  empty: the job's conversation is being forgotten (a chat's turn kept by a
             forget that ended in part); written by the API, read by the API

A folder per job, not all files in one: every atomic write renames inside the folder
it writes, and a rename locks its folder, so listing one shared folder waits for the
renames of low-priority runners (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import sys
import time
from enum import Enum

# How the files are written and read (`files`), under the package's name: `p.write_json`.
from jobs.protocol import files
from jobs.protocol.files import (
    DISK_FULL as DISK_FULL,
    LOGS_CUT_WHILE_WRITTEN as LOGS_CUT_WHILE_WRITTEN,
    NO_FILE_TO_READ as NO_FILE_TO_READ,
    SURROGATE_HALF,
    TMP_SUFFIX as TMP_SUFFIX,
    CorruptJobFile as CorruptJobFile,
    cap_log as cap_log,
    open_log as open_log,
    read_json as read_json,
    read_json_or_none as read_json_or_none,
    read_tail as read_tail,
    readable as readable,
    sync_dir as sync_dir,
    write_atomic as write_atomic,
    write_json as write_json,
)

# Runners import this module: no typing, pathlib or datetime at run time (each costs
# start-up milliseconds in every subprocess).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from jobs.protocol.files import StrPath as StrPath


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
# Why a queued job waits, as the API answers it (never in its file): {"reason": the field
# that says more (depends_on, after, run_at, queue_position), or "kind_cap", ...}.
F_WAITS_FOR = "waits_for"
WAITS_REASON = "reason"
WAITS_KIND_CAP = "kind_cap"
WAITS_MODEL_SLOTS = "model_slots"

JOB_FIELDS = (
    F_ID, F_KIND, F_STATE, F_CREATED_AT, F_STARTED_AT, F_FINISHED_AT, F_TIMEOUT_S,
    F_QUEUE_POSITION, F_PROGRESS, F_OUTPUT, F_RESULT, F_ERROR, F_PID, F_EXIT_CODE,
    F_RESOURCES, F_INPUT, F_CREATED_NS, F_LAUNCHER, F_HOST, F_AFTER, F_RERUN_OF, F_PRIORITY,
    F_RUN_AT, F_ATTEMPT, F_MAX_ATTEMPTS, F_EARLIER_ERRORS, F_SCHEDULE, F_DEPENDS_ON,
)

# A runner's exit code after a transient failure with attempts left: it recorded the error
# in a job file it left `running`, and the supervisor queues the job again.
EXIT_RETRY = 75  # EX_TEMPFAIL
# A runner's exit code when its final state found no room on the data folder's disk for
# as long as it waits: the supervisor's final word says so.
EXIT_NO_ROOM = 73  # EX_CANTCREAT
# How long a runner waits to write its final state into an unwritable data folder; the
# supervisor's stop at a deadline waits as long while its stop request cannot be written
# (OFFLOAD_FINAL_WRITE_PATIENCE_S, which runners get in their environment).
FINAL_WRITE_PATIENCE_S = 600.0
FINAL_WRITE_PATIENCE_ENV = "OFFLOAD_FINAL_WRITE_PATIENCE_S"
# How often it tries that write again; a stop request written late (the folder writable
# again) waits twice as long before the runner is stopped, for its final state to land.
FINAL_RETRY_S = 0.5

JOB_FILE = "job.json"
LOG_FILE = "job.log"
STOP_FILE = "stop.json"
RUN_FILE = "run.json"
# Empty, so that a forget marks its turns on a full disk too, as an empty stop.json.
FORGOTTEN_FILE = "forgotten"

LOCAL = "local"
RAY = "ray"

# The kinds that come with Offload, and the module that runs each.
BUILT_IN_KINDS = {"chat": "runners.chat", "sleep": "runners.sleep", "train": "runners.train"}

# The project's folder (the one holding jobs/ and runners/): where its processes start.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def _python_for_children() -> tuple[str, dict[str, str]]:
    """The interpreter to start a project's Python child with, and what its environment
    needs for it. On Windows a venv's python.exe is a redirector that starts the real
    interpreter as a child of its own (bpo-35797): started through it, a child's pid is
    not the one Popen gives, nor is its parent the process that started it. As
    multiprocessing does there, the base interpreter is started, told the venv by
    __PYVENV_LAUNCHER__."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    if sys.platform == "win32" and os.path.normcase(base) != os.path.normcase(sys.executable):
        return base, {"__PYVENV_LAUNCHER__": sys.executable}
    return sys.executable, {}


# Never a bare "python" from PATH: it may be a shim, or another interpreter.
PYTHON, PYTHON_ENV = _python_for_children()


def port_taken(exc: OSError) -> bool:
    """Whether a bind failed because another program listens there: Windows says EACCES
    for a port another program holds for itself alone."""
    return exc.errno == errno.EADDRINUSE or (os.name == "nt" and exc.errno in (
        errno.EACCES, getattr(errno, "WSAEACCES", None)))


# Set by launch.py for the server it starts: its pid, whose end stops that server.
LAUNCHER_PID_ENV = "OFFLOAD_LAUNCHER_PID"
# Set by a launcher that puts a runner's claim on disk itself: DURABLE once it has, or
# the number of a pipe on which it writes DURABLE_WORD when it has (closed: do it yourself).
CLAIM_WORD_ENV = "OFFLOAD_CLAIM_WORD"
# Set for the runners a supervisor starts: a runner without it was started by hand.
LAUNCHED_ENV = "OFFLOAD_LAUNCHED"
DURABLE = "durable"
DURABLE_WORD = f"{DURABLE}\n".encode()
CLAIM_WORD_TIMEOUT_S = 5.0  # then the runner syncs its claim itself

# A launch record names the job file its runner was started for: a copy of the data folder
# (a backup restored beside the original) holds the original's records, whose runners run
# the original's jobs, not the copy's.
RUN_JOB_FILE = "job_file"


def launch_record(job_file: StrPath, record: dict[str, Any]) -> dict[str, Any]:
    """`record` as run.json holds it: with the job file it was written for."""
    return {**record, RUN_JOB_FILE: os.fspath(job_file)}


def launched_elsewhere(job_file: StrPath, record: dict[str, Any]) -> str | None:
    """The other job file a launch record was written for (the folder was copied or
    moved since), or None: this one's, or a record written before records said it."""
    named = record.get(RUN_JOB_FILE)
    if not isinstance(named, str) or same_folder(os.path.dirname(named),
                                                 os.path.dirname(os.fspath(job_file))):
        return None
    return named


def same_folder(one: StrPath, other: StrPath) -> bool:
    """Whether two paths name one folder: the same path, or one reached another way (a
    bind mount, a mapped drive); a path with no folder there now (moved) is another."""
    if os.fspath(one) == os.fspath(other):
        return True
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


_HEX = frozenset("0123456789abcdef")


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


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float | None:
    """'6h' -> 21600.0, as schedules and the CLI take a length of time ('90s', '30m',
    '1d'; a bare number is seconds); None for anything else."""
    match = _DURATION.fullmatch(text.lower())
    return float(match[1]) * _UNIT_S[match[2]] if match else None


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


def holds_no_job(job: dict[str, Any]) -> bool:
    """Whether `job` is what a reader shows for a file that holds no job (`corrupt`)."""
    error = job.get(F_ERROR)
    return isinstance(error, dict) and error.get("type") == ErrorType.CORRUPT


def fifo_key(job: dict[str, Any]) -> tuple[int, str]:
    """Submission order: by creation time, ties broken by id."""
    created = job.get(F_CREATED_NS)
    if type(created) is not int or not 0 <= created < 2**63:  # a file edited by hand
        try:
            created = int(parse_iso(str(job.get(F_CREATED_AT))) * 1e9)
        except (ValueError, OverflowError):
            created = 0
        created = min(max(created, 0), 2**63 - 1)  # the index keeps them in 64 bits
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


# An event's output (docs/contract.md, "Jobs": `/events`): appended to the client's copy; F_OUTPUT
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


MAX_BODY_BYTES = 1_000_000  # a request body larger than this is refused with 413
MAX_DEPTH = 64  # of arrays and objects in a job's input (pydantic answers go to ~250)
NOT_TEXT = "holds half of a surrogate pair (not text)"


def json_problem(value: Any, limit: int = MAX_DEPTH, depth_only: bool = False) -> str | None:
    """What keeps `value` from being a job's plain JSON, or None: nesting beyond `limit`;
    unless `depth_only` (a runner's result may hold a NaN loss, shown as null), a number
    that is not finite, a string with a surrogate half or a value JSON has not (a date)."""
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
            elif isinstance(item, str) and SURROGATE_HALF.search(item) is not None:
                return f"a string {NOT_TEXT}"
            elif not isinstance(item, (str, int, float, type(None))):  # bool is an int
                # A TOML date or time (a schedule's input): no job file could hold it.
                return (f"{str(item)[:80]!r} (a {type(item).__name__}) is no JSON value; "
                        "give it as a string")
        if not deeper:
            return None
        level = deeper
    return f"nested more than {limit} levels deep"


def sync_claim(job_file: StrPath) -> None:
    """Put the job's claim (its `run.json`, when it has one) on disk, with its name in the
    job's folder: a runner does so before it runs anything of its job, so a power cut
    before then leaves no claim, and a job that never ran runs after the restart. A
    runner whose launcher syncs the claim while it starts waits for its word instead."""
    word = os.environ.pop(CLAIM_WORD_ENV, None)  # the runner's children never see it
    run_file = sibling(job_file, RUN_FILE)
    try:
        fd = os.open(run_file, os.O_RDWR | getattr(os, "O_BINARY", 0)) if files.FSYNC else -1
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


def request_stop(job_file: StrPath, reason: str) -> bool:
    """Leave a stop request for a runner (or a queued job) to find; False where a cancel
    found no room for it (a full disk) and was left as an empty file, which needs no room
    for data and is read as a cancel: it outlasts a restart as the request would (or a
    cancel asked before stands: its final state waits for room all the same)."""
    path = sibling(job_file, STOP_FILE)
    try:
        write_json(path, {"reason": reason, "at": now_iso()})
        return True
    except OSError as exc:
        if exc.errno not in DISK_FULL or reason != JobState.CANCELLED:
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | files.NO_FOLLOW,
                             0o600))
        except FileExistsError:  # a stop was asked already: it stands, whole or empty
            # A cancel's final state waits for room as this one's would; a deadline's
            # request ends the job `timeout`, not the cancel the caller is told of.
            return stop_reason(job_file) != JobState.CANCELLED
        except OSError:
            raise exc from None
        return False


def stop_reason(job_file: StrPath) -> str | None:
    path = sibling(job_file, STOP_FILE)
    with contextlib.suppress(OSError):
        if os.stat(path).st_size == 0:
            return JobState.CANCELLED  # a cancel left with no room for its request
    try:
        data = read_json(path)
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


