"""Idempotency keys, one file each: `<data>/idempotency/<sha256 of the key>.json` names
the job the key created and a fingerprint of its request.

A request claims a key by creating its file (O_EXCL: across every worker exactly one
does), then stores the job. A key file whose job is not there once the file is older
than PENDING_S (the request failed or died before storing it, or the job was deleted)
is released, so the retry creates the job. The job's folder names its key file
(`KEY_LINK`), so removing the job (pruning) releases its key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from jobs import protocol as p
from jobs.protocol import files

PENDING_S = 2.0  # a key file younger than this whose job is missing is still being stored
STORING_S = 60.0  # a job folder without its job file this young: its job is being stored
RELEASE_LOCK_S = 10.0  # releasing waits this long for another release
KEY_LINK = "idempotency-key"  # in a job's folder: the name of its key's file
_LOCK_FILE = ".release.lock"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Claim:
    """What a key file says; `job_id` is None while it is being written, or if damaged."""

    job_id: str | None
    fingerprint: str | None
    age_s: float


def key_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    """The key files of one data folder. Every method raises OSError when the disk fails."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def read(self, name: str) -> Claim | None:
        """The key's claim, None if nobody holds it. Never waits (unlike `p.read_json`,
        which retries): it runs on the event loop."""
        try:
            with open(self.path(name), "rb") as f:
                raw = f.read()
                age_s = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            record = None  # still being written by its claimer, or damaged
        if not isinstance(record, dict):
            return Claim(None, None, age_s)
        job_id, fingerprint = record.get("job_id"), record.get("fingerprint")
        return Claim(job_id if isinstance(job_id, str) and p.is_valid_id(job_id) else None,
                     fingerprint if isinstance(fingerprint, str) else None, age_s)

    def claim(self, name: str, job_id: str, fingerprint: str) -> bool:
        """Claim the key for a new job; False if somebody holds it. When its file cannot
        be written, raises and leaves no claim behind."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps({"job_id": job_id, "fingerprint": fingerprint}).encode())
                if files.FSYNC:  # a power loss after the 202 must not let a retry run it twice
                    f.flush()
                    os.fsync(f.fileno())
            p.sync_dir(self.folder)
        except OSError:
            self.drop_own(name)
            raise
        return True

    def drop_own(self, name: str) -> None:
        """Undo this request's own claim, whose job was not stored. Without the lock:
        nobody else deletes a claim this young that names a job never stored."""
        with contextlib.suppress(OSError):
            os.unlink(self.path(name))

    def release(self, name: str, job_id: str | None, job_folder: Path | None = None) -> bool:
        """Delete the key file if it still names `job_id` (None: an unfinished or damaged
        one, then only once older than PENDING_S) and its job is not being stored (its
        `job_folder` made less than STORING_S ago). Under a lock, so that two requests
        releasing the same stale claim never delete the new claim one of them made
        meanwhile. Blocks: call it from a worker thread."""
        with FileLock(str(self.folder / _LOCK_FILE), timeout=RELEASE_LOCK_S, mode=0o600):
            claim = self.read(name)
            if claim is None or claim.job_id != job_id:
                return False
            if job_id is None and claim.age_s < PENDING_S:
                return False
            if job_folder is not None and being_stored(job_folder):
                return False  # a slow disk: its claimer is still writing the job
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(name))
        return True

    @staticmethod
    def link(job_folder: Path, name: str) -> None:
        """Record in a new job's folder which key created it, before its job file, whose
        durable write syncs the folder after it: a pruned job must release its key."""
        with open(job_folder / KEY_LINK, "wb") as f:
            f.write(name.encode("ascii"))
            if files.FSYNC:
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def linked(job_folder: Path) -> str | None:
        try:
            name = (job_folder / KEY_LINK).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if len(name) == 64 and _HEX.issuperset(name) else None


def being_stored(job_folder: Path) -> bool:
    """Whether a job folder without its job file may still get it: made less than
    STORING_S ago (a slow disk), and no writer of its temp file known to be gone (its pid
    is in the file's name; /proc tells, where there is one). A request that died while
    storing held its key for a minute."""
    try:
        if time.time() - job_folder.stat().st_mtime >= STORING_S:
            return False
        temp = f".{p.JOB_FILE}."  # then the writer's pid (p.write_atomic)
        writers = [name[len(temp):].split(".")[0] for name in os.listdir(job_folder)
                   if name.startswith(temp) and name.endswith(p.TMP_SUFFIX)]
    except OSError:
        return False
    if not writers or not os.path.isdir("/proc/self"):
        return True
    return any(os.path.isdir(f"/proc/{pid}") for pid in writers if pid.isdigit())
