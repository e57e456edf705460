"""Job files on disk: create, read, list, cancel, prune. Knows nothing of processes.

Every id is validated (32 lowercase hex) before it is turned into a path.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.kinds import KINDS
from jobs.models import Job

log = logging.getLogger(__name__)


class JobNotFound(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class UnknownKind(ValueError):
    def __init__(self, kind: str) -> None:
        known = ", ".join(sorted(KINDS))
        super().__init__(f"unknown job kind {kind!r}; known kinds: {known}")


class StoreUnavailable(Exception):
    """The data folder cannot be written (disk full, read-only, permissions)."""


@dataclass
class _Cached:
    mtime_ns: int
    size: int
    data: dict[str, Any]


class JobStore:
    def __init__(self, jobs_dir: Path) -> None:
        self.dir = jobs_dir
        self._cache: dict[str, _Cached] = {}
        self._scan_lock = threading.Lock()  # routes scan from several worker threads
        self._last_scan: tuple[float, list[dict[str, Any]]] | None = None

    def ensure_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the job folder {self.dir}: {exc}") from exc

    def path(self, job_id: str) -> Path:
        if not p.is_valid_id(job_id):
            raise JobNotFound(job_id)
        return self.dir / job_id / p.JOB_FILE

    def create(self, kind: str, job_input: dict[str, Any], timeout_s: float,
               job_id: str | None = None) -> dict[str, Any]:
        if kind not in KINDS:
            raise UnknownKind(kind)
        job_id = job_id or p.new_id()
        data = p.new_job(job_id, kind, job_input, timeout_s)
        path = self.path(job_id)
        try:
            self.ensure_dir()
            path.parent.mkdir()
            p.write_json(path, data)
        except OSError as exc:
            reason = exc.strerror or exc
            raise StoreUnavailable(f"cannot store the job in {self.dir}: {reason}") from exc
        return data

    def read(self, job_id: str) -> dict[str, Any]:
        """The raw job dict; a corrupt file reads as a failed job that says so."""
        path = self.path(job_id)
        try:
            data = p.read_json(path)
        except p.CorruptJobFile as exc:
            return _corrupt(job_id, path, str(exc))
        if data is None:
            raise JobNotFound(job_id)
        return data

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self.read(job_id))

    def request_cancel(self, job_id: str) -> None:
        path = self.path(job_id)
        if not path.exists():
            raise JobNotFound(job_id)
        try:
            p.request_stop(path, p.CANCELLED)
        except OSError as exc:
            reason = exc.strerror or exc
            raise StoreUnavailable(f"cannot record the cancel request: {reason}") from exc

    def scan(self, max_age_s: float = 0.0) -> list[dict[str, Any]]:
        """Every job on disk, re-reading only the files that changed since the last scan.

        With `max_age_s`, a scan that recent is answered again: overviews polled many
        times a second then cost one look at the folder, not one each.
        """
        with self._scan_lock:
            now = time.monotonic()
            if self._last_scan is None or now - self._last_scan[0] > max_age_s:
                self._last_scan = (now, list(self._scan()))
            return self._last_scan[1]

    def recent_scan(self, max_age_s: float) -> list[dict[str, Any]] | None:
        """The last scan if it is that recent, else None; never touches the disk."""
        last = self._last_scan
        if last is not None and time.monotonic() - last[0] <= max_age_s:
            return last[1]
        return None

    def _scan(self) -> Iterator[dict[str, Any]]:
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            job_id = entry.name
            if not p.is_valid_id(job_id):
                continue
            data = self._cached_read(job_id, os.path.join(entry.path, p.JOB_FILE))
            if data is not None:
                seen.add(job_id)
                yield data
        for gone in self._cache.keys() - seen:
            self._cache.pop(gone, None)

    def _cached_read(self, job_id: str, path: str) -> dict[str, Any] | None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        cached = self._cache.get(job_id)
        if cached and cached.mtime_ns == st.st_mtime_ns and cached.size == st.st_size:
            return cached.data
        try:
            data = p.read_json(path)
        except p.CorruptJobFile as exc:
            data = _corrupt(job_id, Path(path), str(exc))
        if data is None:
            return None
        self._cache[job_id] = _Cached(st.st_mtime_ns, st.st_size, data)
        return data

    def list_jobs(self, state: str | None = None, kind: str | None = None, limit: int = 100,
             jobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Newest first, with queue positions filled in for queued jobs."""
        jobs = self.scan() if jobs is None else jobs
        positions = _queue_positions(jobs)
        selected = [
            dict(j, **{p.F_QUEUE_POSITION: positions.get(j[p.F_ID])})
            for j in jobs
            if (state is None or j.get(p.F_STATE) == state)
            and (kind is None or j.get(p.F_KIND) == kind)
        ]
        selected.sort(key=_created_key, reverse=True)
        return selected[:limit]

    def queue_position(self, job_id: str) -> int | None:
        return _queue_positions(self.scan()).get(job_id)

    def counts(self, jobs: list[dict[str, Any]] | None = None) -> dict[str, int]:
        counts = dict.fromkeys(p.STATES, 0)
        for job in self.scan() if jobs is None else jobs:
            state = job.get(p.F_STATE)
            if state in counts:
                counts[str(state)] += 1
        return counts

    def prune(self, retention_s: float, now: float | None = None) -> int:
        """Delete finished jobs (and their log, stop and run files) older than retention."""
        cutoff = (now if now is not None else time.time()) - retention_s
        removed = 0
        for job in self.scan():
            if job.get(p.F_STATE) not in p.FINAL_STATES:
                continue
            finished = job.get(p.F_FINISHED_AT) or job.get(p.F_CREATED_AT)
            try:
                finished_ts = p.parse_iso(str(finished))
            except ValueError:
                finished_ts = 0.0
            if finished_ts < cutoff:
                self.remove(job[p.F_ID])
                removed += 1
        return removed

    def remove(self, job_id: str) -> None:
        """Delete the job's folder: job file, log, stop and run records."""
        folder = self.path(job_id).parent
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove job %s: %s", job_id, exc)
        self._cache.pop(job_id, None)


def _queue_positions(jobs: list[dict[str, Any]]) -> dict[str, int]:
    queued = sorted((j for j in jobs if j.get(p.F_STATE) == p.QUEUED), key=_created_key)
    return {str(j[p.F_ID]): i for i, j in enumerate(queued)}


def _created_key(job: dict[str, Any]) -> tuple[int, str]:
    return p.fifo_key(job)


def _corrupt(job_id: str, path: Path, detail: str) -> dict[str, Any]:
    try:
        created_at = p.iso(path.stat().st_mtime)
    except OSError:
        created_at = p.now_iso()
    data = p.new_job(job_id, "unknown", {}, 0)
    data.update({
        p.F_STATE: p.FAILED, p.F_CREATED_AT: created_at, p.F_FINISHED_AT: created_at,
        p.F_ERROR: {"type": p.ERR_CORRUPT,
                    "message": f"the job file is damaged and cannot be read ({detail})"},
    })
    return data
