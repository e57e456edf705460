"""The job counters behind `GET /metrics`: jobs finished by kind and state, failures by
error type, queue waits and run times (histograms), chat tokens.

The leading supervisor is their one writer: it sees each job start and end once (it
launches every job and finalizes every runner, its own or adopted) and replaces
`<data>/job_counters.json` at most every SAVE_EVERY_S. Every API worker reads that file,
so all workers answer alike, and the counts only grow while the data folder lasts:
pruning a job leaves them alone, and the next leader goes on from the file. A job that
ended while no supervisor led (a handover) is counted by the next leader when it finds
the job finished after the file's last save.

Standard library only, like the rest of the protocol.
"""

from __future__ import annotations

import errno
import math
import os
import sys

from jobs import protocol as p

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, TypeGuard

COUNTERS_FILE = "job_counters.json"
SAVE_EVERY_S = 0.25  # a crash loses at most this much of the counts
# Histogram bucket bounds in seconds: from a chat that starts at once to a long training.
BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
             600.0, 1800.0, 3600.0)
TOKEN_FIELDS = {"prompt": "prompt_tokens", "completion": "completion_tokens"}
# A job that ended like this is a failure; a cancelled one is not (someone asked for it).
FAILED_STATES = frozenset({p.JobState.FAILED, p.JobState.TIMEOUT})


def counters_file(data_dir: p.StrPath) -> str:
    return os.path.join(data_dir, COUNTERS_FILE)


# A job removed (or its conversation forgotten) as its runner ended: what the leader counts
# of it, left where it looks once it finds the job file gone. Kept this long at most.
REMOVED_DIR = "removed"
REMOVED_NOTE_S = 600.0


def removed_note_path(job_file: p.StrPath) -> str:
    """The note of the job of `job_file` (`<data>/jobs/<id>/job.json`) removed."""
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.fspath(job_file))))
    return os.path.join(data_dir, REMOVED_DIR, f"{p.id_of(job_file)}.json")


def note_removed(job_file: p.StrPath, job: dict[str, Any], now: float) -> None:
    """Leave what the counters take of `job`, a finished job about to be removed, unless
    it ended too long ago for its runner's end to be uncounted still. Best effort: a
    count missed is no reason to keep a job its owner removes."""
    finished = _time(job.get(p.F_FINISHED_AT))
    if finished is None or now - finished > REMOVED_NOTE_S:
        return
    error, result = job.get(p.F_ERROR), job.get(p.F_RESULT)
    usage = result.get("usage") if isinstance(result, dict) else None
    counted = {key: job.get(key) for key in (p.F_ID, p.F_KIND, p.F_STATE, p.F_STARTED_AT,
                                             p.F_FINISHED_AT)}
    counted[p.F_ERROR] = {"type": error.get("type")} if isinstance(error, dict) else None
    counted[p.F_RESULT] = {"usage": usage} if isinstance(usage, dict) else None
    path = removed_note_path(job_file)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        p.write_json(path, counted, durable=False)
    except OSError:
        pass


def take_removed_note(job_file: p.StrPath) -> dict[str, Any] | None:
    """The note of the job of `job_file` removed as it ended, taken away; None if none."""
    path = removed_note_path(job_file)
    try:
        note = p.read_json_or_none(path)
        os.unlink(path)
    except OSError:
        return None
    return note if isinstance(note, dict) else None


def removed_notes(data_dir: p.StrPath) -> list[dict[str, Any]]:
    """Every note of a job removed as it ended (a leader taking over counts those no
    leader did: their runners ended while none watched)."""
    folder = os.path.join(data_dir, REMOVED_DIR)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    notes = []
    for name in names:
        try:
            note = p.read_json_or_none(os.path.join(folder, name))
        except OSError:
            continue
        if isinstance(note, dict):
            notes.append(note)
    return notes


def prune_removed_notes(data_dir: p.StrPath, now: float) -> None:
    """Notes older than REMOVED_NOTE_S: of jobs counted before they were removed."""
    folder = os.path.join(data_dir, REMOVED_DIR)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        try:
            if now - os.stat(path).st_mtime > REMOVED_NOTE_S:
                os.unlink(path)
        except OSError:
            continue


class Histogram:
    """Observations per bucket (not cumulative; the last one is above every bound)."""

    def __init__(self, counts: list[int] | None = None, total: float = 0.0) -> None:
        self.counts = counts if counts is not None else [0] * (len(BUCKETS_S) + 1)
        self.sum = total

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        at = next((i for i, bound in enumerate(BUCKETS_S) if seconds <= bound), len(BUCKETS_S))
        self.counts[at] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it), as Prometheus exposes them."""
        running, out = 0, []
        for bound, count in zip((*BUCKETS_S, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), running))
        return out

    def as_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "sum": self.sum}

    @classmethod
    def from_json(cls, value: object) -> Histogram:
        if isinstance(value, dict):
            counts, total = value.get("counts"), value.get("sum")
            if (isinstance(counts, list) and len(counts) == len(BUCKETS_S) + 1
                    and all(_count(c) for c in counts) and _amount(total)):
                return cls(list(counts), float(total))
        return cls()  # another version's buckets, or damaged: this histogram starts again


class JobCounters:
    """The counts, as kept in memory by the leader and read back by the API."""

    def __init__(self) -> None:
        self.since = p.now_iso()
        self.saved_at: float | None = None  # POSIX time of the last save by a leader
        self.finished: dict[str, dict[str, int]] = {}  # kind -> state -> jobs
        self.failures: dict[str, dict[str, int]] = {}  # kind -> error type -> jobs
        self.retries: dict[str, dict[str, int]] = {}  # kind -> error type -> attempts retried
        self.queue_wait: dict[str, Histogram] = {}  # kind -> seconds from due to start
        self.duration: dict[str, Histogram] = {}  # kind -> seconds from start to end
        self.tokens = dict.fromkeys(TOKEN_FIELDS, 0)
        # The jobs the last leader watched run at its last save: one that ended then but
        # was not counted yet (its runner still exiting) is counted by the next leader.
        self.running: frozenset[str] = frozenset()
        self.dirty = False

    # -- counting (the leading supervisor) ------------------------------------------

    def started(self, job: dict[str, Any], now: float) -> None:
        """A job launched at `now`: how long it waited since it was due (its `run_at`
        when it has one, else its creation)."""
        due = max((t for t in (_time(job.get(p.F_CREATED_AT)), _time(job.get("run_at")))
                   if t is not None), default=None)
        if due is not None:
            self.queue_wait.setdefault(_kind(job), Histogram()).observe(now - due)
            self.dirty = True

    def ended(self, job: dict[str, Any]) -> None:
        """A job whose final state is on disk."""
        kind, state = _kind(job), str(job.get(p.F_STATE))
        by_state = self.finished.setdefault(kind, {})
        by_state[state] = by_state.get(state, 0) + 1
        if state in FAILED_STATES:
            error = job.get(p.F_ERROR)
            error_type = str(error.get("type")) if isinstance(error, dict) else "unknown"
            by_type = self.failures.setdefault(kind, {})
            by_type[error_type] = by_type.get(error_type, 0) + 1
        started, finished = _time(job.get(p.F_STARTED_AT)), _time(job.get(p.F_FINISHED_AT))
        if started is not None and finished is not None:
            self.duration.setdefault(kind, Histogram()).observe(finished - started)
        result = job.get(p.F_RESULT)
        usage = result.get("usage") if isinstance(result, dict) else None
        if state == p.JobState.COMPLETED and isinstance(usage, dict):
            for direction, field in TOKEN_FIELDS.items():
                if isinstance(usage.get(field), int) and usage[field] > 0:
                    self.tokens[direction] += usage[field]
        self.dirty = True

    def retried(self, job: dict[str, Any], error_type: str) -> None:
        """An attempt failed for a transient reason and the job was queued again."""
        by_type = self.retries.setdefault(_kind(job), {})
        by_type[error_type] = by_type.get(error_type, 0) + 1
        self.dirty = True

    def missed(self, job: dict[str, Any]) -> bool:
        """A finished job that no leader counted: it finished after the last save (while
        no supervisor led, or after a leader's last save before it died), or was still
        running for the leader at that save (its final state written, its runner not yet
        gone: a job is counted once its runner is)."""
        if job.get(p.F_ID) in self.running:
            return True
        finished = _time(job.get(p.F_FINISHED_AT))
        return self.saved_at is not None and finished is not None and finished > self.saved_at

    # -- the file --------------------------------------------------------------------

    def save(self, path: p.StrPath, now: float, running: Iterable[str] = ()) -> None:
        """Saved with the jobs the leader watches run now (`running`)."""
        p.write_json(path, {**self.as_json(), "saved_at": now, "running": sorted(running)})
        self.saved_at = now
        self.running = frozenset()  # the last leader's, for this one's first pass only
        self.dirty = False

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since, "saved_at": self.saved_at, "buckets_s": list(BUCKETS_S),
            "finished": self.finished, "failures": self.failures, "retries": self.retries,
            "queue_wait": {k: h.as_json() for k, h in self.queue_wait.items()},
            "duration": {k: h.as_json() for k, h in self.duration.items()},
            "tokens": self.tokens,
        }

    def add(self, other: JobCounters) -> None:
        """Count `other`'s counts too (those kept while the file could not be read)."""
        for mine, theirs in ((self.finished, other.finished), (self.failures, other.failures),
                             (self.retries, other.retries)):
            for kind, counts in theirs.items():
                into = mine.setdefault(kind, {})
                for key, count in counts.items():
                    into[key] = into.get(key, 0) + count
        for histograms, more in ((self.queue_wait, other.queue_wait),
                                 (self.duration, other.duration)):
            for kind, histogram in more.items():
                into_h = histograms.setdefault(kind, Histogram())
                into_h.counts = [a + b for a, b in zip(into_h.counts, histogram.counts,
                                                       strict=True)]
                into_h.sum += histogram.sum
        for direction in TOKEN_FIELDS:
            self.tokens[direction] += other.tokens[direction]
        self.dirty = self.dirty or other.dirty

    @classmethod
    def load(cls, path: p.StrPath) -> JobCounters:
        """The counts saved at `path`; none (from zero) if there is no such file, and
        what is damaged in one starts again from zero. A file that cannot be read now
        (out of file handles, say) raises OSError: zeros would read as a reset, and a
        leader that saved them would lose the counts for good."""
        counters = cls()
        data = _saved(path)
        if data is None:
            return counters
        if isinstance(data.get("since"), str):
            counters.since = data["since"]
        if _amount(data.get("saved_at")):
            counters.saved_at = float(data["saved_at"])
        if isinstance(data.get("running"), list):
            counters.running = frozenset(str(job_id) for job_id in data["running"])
        counters.finished = _nested_counts(data.get("finished"))
        counters.failures = _nested_counts(data.get("failures"))
        counters.retries = _nested_counts(data.get("retries"))
        same_buckets = data.get("buckets_s") == list(BUCKETS_S)
        for name in ("queue_wait", "duration"):
            found = data.get(name) if same_buckets else None
            if isinstance(found, dict):
                setattr(counters, name, {str(kind): Histogram.from_json(value)
                                         for kind, value in found.items()})
        tokens = data.get("tokens")
        if isinstance(tokens, dict):
            for direction in TOKEN_FIELDS:
                if _count(tokens.get(direction)):
                    counters.tokens[direction] = tokens[direction]
        return counters


def _saved(path: p.StrPath) -> dict[str, Any] | None:
    """The file's object; None where there is none or it is damaged. Raises OSError where
    it cannot be read for now, or by this account (another's, say), or a folder is in its
    place: zeros would be saved over its counts, or never saved."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"a folder is in the place of {path}: move it "
                                              "away")
    try:
        return p.read_json(path)
    except p.CorruptJobFile as exc:
        if isinstance(exc.__cause__, PermissionError):
            raise exc.__cause__ from None
        return None


def _kind(job: dict[str, Any]) -> str:
    return str(job.get(p.F_KIND) or "unknown")


def _time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return p.parse_iso(value)
    except ValueError:
        return None


def _nested_counts(value: object) -> dict[str, dict[str, int]]:
    if not isinstance(value, dict):
        return {}
    return {str(outer): {str(k): n for k, n in inner.items() if _count(n)}
            for outer, inner in value.items() if isinstance(inner, dict)}


def _count(value: object) -> bool:
    """A count as saved: a whole number, not negative, not a flag, and one a float holds
    (edited by hand: -5 was shown, 10**400 failed every scrape and the leader's saves)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2 ** 63


def _amount(value: object) -> TypeGuard[float]:
    """A sum or a time as saved: a number, not negative, finite, as a float (compared, not
    converted: 10**400 is no float)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 <= value <= sys.float_info.max)
