"""A process known by its pid and its start time: a pid alone may be reused by another
process once the first one is gone; the pair is not."""

from __future__ import annotations

import psutil

_TOLERANCE_S = 0.05  # create times compared to this precision


def find(pid: int, create_time: float | None) -> psutil.Process | None:
    """The live process with this pid and create time, or None."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > _TOLERANCE_S:
            return None  # the pid was reused by another process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def taken_by_another(pid: int, create_time: float | None) -> bool:
    """Whether a live process other than the one known by (pid, create time) has this
    pid now (with no create time known, any that has it may be another)."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot be told
    return create_time is None or abs(created - create_time) > _TOLERANCE_S
