"""Job files on disk: create, read, list, cancel, prune. Knows nothing of processes.

Every id is validated (32 lowercase hex) before it is turned into a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.kinds import UnknownKind, registry
from jobs.protocol.counters import note_removed
from jobs.store.errors import StoreUnavailable as StoreUnavailable
from jobs.store.idempotency import Keys, being_stored
from jobs.store.index import JobIndex
from jobs.store.reading import read_job

log = logging.getLogger(__name__)
FORGOTTEN_SESSIONS = "forgotten-sessions"  # in the data folder: one empty file a forgotten id


class JobNotFound(Exception):
    def __init__(self, job_id: str) -> None:
        # Any text can be sent as an id: the message quotes no more than an id's length.
        shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
        super().__init__(f"no job with id {shown!r}")
        self.job_id = job_id


class JobStore(JobIndex):
    """Job files: create, read, cancel, prune; listing and counting from the index."""

    def ensure_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the job folder {self.dir}: {exc}") from exc

    def path(self, job_id: str) -> Path:
        try:
            return Path(p.job_path(self.dir, job_id))
        except ValueError:  # no job id: no such job
            raise JobNotFound(job_id) from None

    @cached_property
    def keys(self) -> Keys:
        """The data folder's idempotency keys."""
        return Keys(self.dir.parent / "idempotency")

    def create(self, kind: str, job_input: dict[str, Any], timeout_s: float,
               job_id: str | None = None, key_name: str | None = None,
               fields: dict[str, Any] | None = None,
               on_stored: Callable[[str], None] | None = None,
               created: float | None = None) -> dict[str, Any]:
        """Store a new job; `key_name`: the idempotency key that claimed it, released
        when the job is removed; `fields`: set in the job file besides the input;
        `on_stored(id)`: called once the job's file is in place (fsync'd, its folders not
        yet), so a supervisor can start on it while the folders are synced; `created`: its
        creation time (a POSIX time), by default now."""
        if kind not in registry():
            raise UnknownKind(kind)
        job_id = job_id or p.new_id()
        data = p.new_job(job_id, kind, job_input, timeout_s, created)
        data.update(fields or {})
        path = self.path(job_id)
        try:
            self.ensure_dir()
            path.parent.mkdir()
            if key_name is not None:
                Keys.link(path.parent, key_name)
            p.write_json(path, data, durable=True, sync_folder=False)
        except OSError as exc:
            if not path.exists():  # not stored: leave no folder that holds no job (and
                # a schedule's slot whose creation stopped there is created on its next try)
                shutil.rmtree(path.parent, ignore_errors=True)
            reason = exc.strerror or exc
            raise StoreUnavailable(f"cannot store the job in {self.dir}: {reason}") from exc
        self.stored(job_id)
        # In place now: the supervisor may start it at once, so it is the caller's job even
        # if the disk then fails to sync its folders (a "not stored" made retries run twice).
        if on_stored is not None:
            on_stored(job_id)
        try:
            p.sync_dir(path.parent)  # on disk before the 202, with the job's folder
            p.sync_dir(self.dir)
        except OSError as exc:
            log.error("job %s is stored, but its folder could not be synced (%s): a power "
                      "cut now could lose it", job_id, exc.strerror or exc)
        return data

    def read(self, job_id: str) -> dict[str, Any]:
        """The raw job dict; a corrupt file reads as a failed job that says so."""
        data = read_job(job_id, self.path(job_id))
        if data is None:
            raise JobNotFound(job_id)
        return data

    def request_cancel(self, job_id: str) -> bool:
        """Leave the job's cancel request; False where a full disk left it empty (it stands
        all the same, but the job's final state will wait for room too)."""
        path = self.path(job_id)
        if not path.exists():
            raise JobNotFound(job_id)
        try:
            return p.request_stop(path, p.JobState.CANCELLED)
        except OSError as exc:
            reason = exc.strerror or exc
            raise StoreUnavailable(f"cannot record the cancel request: {reason}",
                                   "The job was not cancelled") from exc

    def mark_forgotten(self, job_id: str) -> None:
        """Mark the job as a turn of a conversation being forgotten, with an empty file:
        it needs no room for data, so a turn that a forget on a full disk keeps carries it
        all the same. A job removed meanwhile needs no mark."""
        folder = self.path(job_id).parent
        try:
            os.close(os.open(folder / p.FORGOTTEN_FILE,
                             os.O_WRONLY | os.O_CREAT | p.files.NO_FOLLOW, 0o600))
            p.sync_dir(folder)  # a turn kept stays marked through a power cut
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreUnavailable(f"cannot mark turn {job_id} as forgotten: "
                                   f"{exc.strerror or exc}",
                                   "Nothing more was erased: forget the conversation again"
                                   ) from exc

    def is_forgotten(self, job_id: str) -> bool:
        """Whether the job is a turn of a conversation being forgotten (`mark_forgotten`)."""
        return os.path.lexists(self.path(job_id).parent / p.FORGOTTEN_FILE)

    def mark_session_forgotten(self, session_id: str) -> None:
        """Refuse the chat session id from now on (`is_session_forgotten`): an empty file
        named by the id's SHA-256, so the id is not kept, in every worker and restart."""
        folder = self.dir.parent / FORGOTTEN_SESSIONS
        try:
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                p.sync_dir(folder.parent)
            os.close(os.open(folder / _session_name(session_id),
                             os.O_WRONLY | os.O_CREAT | p.files.NO_FOLLOW, 0o600))
            p.sync_dir(folder)  # still refused after a power cut
        except OSError as exc:
            raise StoreUnavailable(f"cannot mark the conversation's session_id as forgotten: "
                                   f"{exc.strerror or exc}",
                                   "Its turns were erased, but a question sent under "
                                   "its session_id is still taken: forget the "
                                   "conversation again") from exc

    def forgotten_marks_problem(self) -> str | None:
        """Why no chat with a session_id is taken now (`is_session_forgotten`), or None."""
        folder = self.dir.parent / FORGOTTEN_SESSIONS
        if not p.files.not_a_folder(folder):
            return None
        return (f"{folder} is no folder, so whether a conversation was forgotten cannot be "
                "told and no chat with a session_id is taken: move it away (the marks it "
                "held are lost)")

    def is_session_forgotten(self, session_id: str) -> bool:
        """Whether the chat session id was forgotten (`mark_session_forgotten`); where the
        marks cannot be read (a file in their folder's place), it raises: a forgotten
        conversation must not be taken again."""
        folder = self.dir.parent / FORGOTTEN_SESSIONS
        try:
            os.lstat(folder / _session_name(session_id))
        except (FileNotFoundError, NotADirectoryError) as exc:
            problem = self.forgotten_marks_problem()  # on Windows too: no file found there
            if problem is None:
                return False
            raise StoreUnavailable(problem, "Nothing was stored", standing=True) from exc
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot tell whether this conversation was forgotten: {folder}, where "
                f"forgotten conversations are marked, cannot be read ({exc.strerror or exc})",
                "Nothing was stored") from exc
        return True

    # -- pruning -------------------------------------------------------------------

    def prune(self, retention_s: float, max_jobs: int | None = None,
              now: float | None = None, min_retention_s: float = 0.0,
              keep: set[str] | None = None) -> int:
        """Delete finished jobs (with their log, stop and run files) older than the
        retention, then the oldest finished ones beyond `max_jobs` jobs in all; never
        one that finished less than `min_retention_s` ago (its client may be polling),
        nor one in `keep`."""
        now = now if now is not None else time.time()
        doomed = self.prunable(now - retention_s, max_jobs, now - min_retention_s,
                               keep or set())
        doomed |= self._abandoned()
        for job_id in doomed:
            self.remove(job_id)
        return len(doomed)

    def _abandoned(self) -> set[str]:
        """Folders whose job file never came (the request storing it died): the input in
        its temp file and its Idempotency-Key go too."""
        with self._lock:
            missing = list(self._missing)
        return {job_id for job_id in missing if not being_stored(self.path(job_id).parent)}

    def remove(self, job_id: str, ended: dict[str, Any] | None = None) -> str | None:
        """Release the idempotency key that created the job, then delete the job's folder
        (job file, log, stop and run records): once the folder is gone, so is its key. A
        pruned job is past its retention, so a retry with its key may make a new one.
        `ended`: the job as read, removed at a client's word (not pruned), perhaps before
        the supervisor has counted its end. Why the folder is not gone, if it is not."""
        folder = self.path(job_id).parent
        if ended is not None:
            note_removed(self.path(job_id), ended, time.time())
        key_name = Keys.linked(folder)
        if key_name is not None:
            try:
                self.keys.release(key_name, job_id)
            except OSError as exc:  # a retry with this key releases it then
                log.warning("could not release the Idempotency-Key of job %s: %s", job_id, exc)
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove job %s: %s", job_id, exc)
            return exc.strerror or str(exc)
        self.forget(job_id)
        return None



def _session_name(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
