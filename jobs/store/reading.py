"""A job file as the store and the supervisor read it, checked once against the job's
model, and the signature that tells a file written again from one unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobs import protocol as p
from jobs.models import Job

Signature = tuple[int, int, int]


def stat_signature(st: os.stat_result) -> Signature:
    """A job file's identity: every write replaces the file (a new inode), and two writes
    within one clock tick of the same size keep mtime and size."""
    return st.st_ino, st.st_mtime_ns, st.st_size


def stat_job_file(path: str) -> os.stat_result:
    """The job file's stat; of the link itself where the link leads nowhere it can end
    (a loop): such a file reads as damaged, and listing goes on."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno not in p.NO_FILE_TO_READ:
            raise
        return os.lstat(path)


def read_job(job_id: str, path: str | Path) -> dict[str, Any] | None:
    """A job file's data, None if there is none; a damaged one, or JSON that is not a
    job, reads as a failed job that says so (a listing must never fail on one file)."""
    try:
        data = p.read_json(path)
    except p.CorruptJobFile as exc:
        return corrupt_job(job_id, Path(path), str(exc))
    except OSError as exc:
        if exc.errno not in p.NO_FILE_TO_READ:
            raise
        return corrupt_job(job_id, Path(path), f"{p.JOB_FILE}: {exc.strerror}")
    if data is None:
        return None
    problem = not_a_job(job_id, data)
    if problem is not None:
        return corrupt_job(job_id, Path(path), f"{p.JOB_FILE}: not a valid job: {problem}")
    return data


def not_a_job(job_id: str, data: dict[str, Any]) -> str | None:
    """What makes `data` no job the API can show (its model), or None; every job file
    read is checked once (reads are cached), a few microseconds each."""
    if data.get(p.F_ID) != job_id:
        return f"its id is {str(data.get(p.F_ID))[:40]!r}, not its folder's"
    # What runners wrote (their result, say); its input was checked at its submission, and
    # may be large: a walk over it cost a read of a 1 MB input 10 ms.
    problem = p.json_problem({k: v for k, v in data.items() if k != p.F_INPUT},
                             p.MAX_DEPTH + 1, depth_only=True)
    if problem is not None:
        return problem
    try:
        Job.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "job"
        return f"{where}: {error['msg']}"
    return None


def corrupt_job(job_id: str, path: Path, detail: str) -> dict[str, Any]:
    try:
        created_at = p.iso(path.stat().st_mtime)
    except OSError:
        created_at = p.now_iso()
    data = p.new_job(job_id, "unknown", {}, 0)
    data.update({
        p.F_STATE: p.JobState.FAILED, p.F_CREATED_AT: created_at, p.F_FINISHED_AT: created_at,
        p.F_ERROR: {"type": p.ErrorType.CORRUPT,
                    "message": f"the job file is damaged and cannot be read ({detail})"},
    })
    return data
