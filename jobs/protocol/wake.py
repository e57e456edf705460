"""The supervisor's files beside the job folder: the lock that elects one leading
supervisor among the API workers' keepers, the wake file any process touches to make the
leader look at the job folder now, and the file its raw output goes to."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# The supervisor's stdout and stderr: what is not a log record (a crash's traceback, the
# fork server's complaints); its keeper opens it, the supervisor caps it.
OUTPUT_FILE = "supervisor.out"


def wake_file(jobs_dir: Path) -> Path:
    return jobs_dir.parent / "supervisor.wake"


def lock_file(jobs_dir: Path) -> Path:
    return jobs_dir.parent / "supervisor.lock"


def poke(jobs_dir: Path) -> None:
    """Wake the leading supervisor from any process: it watches this file's mtime."""
    path = wake_file(jobs_dir)
    try:
        with open(path, "ab") as f:
            f.write(b".")
            if f.tell() > 4096:
                f.truncate(0)
    except OSError as exc:
        log.debug("cannot poke the supervisor: %s", exc)
