"""A process known by its pid and its start time: a pid alone may be reused by another
process once the first one is gone; the pair is not.

Linux counts a process's start from the boot, and psutil adds the boot's time on the wall
clock, which moves whenever the clock is stepped (NTP, a virtual machine's resume, `date
-s`): a runner looked up against the create time recorded at its start then seemed gone,
and was killed as lost. So every create time here is taken against the boot time this
process read first, and a launch record says which one its own was taken against.
"""

from __future__ import annotations

import os
import sys

import psutil

_TOLERANCE_S = 0.05  # create times compared to this precision
_boot: float | None = None
_boot_id: str | None = None


def boot_time() -> float:
    """What this process's create times are taken against: the boot time it read first
    (Linux; elsewhere a create time is the start on the wall clock itself, 0)."""
    global _boot
    if _boot is None:
        _boot = float(psutil.boot_time()) if sys.platform == "linux" else 0.0
    return _boot


def created(pid: int) -> float:
    """The create time of the process with this pid (`psutil.NoSuchProcess` if none)."""
    if sys.platform != "linux":
        return float(psutil.Process(pid).create_time())
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read()
    except OSError:
        raise psutil.NoSuchProcess(pid) from None
    # After the command's name (in parentheses, which it may contain), field 22: the
    # start, in clock ticks since the boot.
    ticks = int(line[line.rindex(b")") + 2:].split()[19])
    return boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def boot_id() -> str:
    """This boot's id (Linux; elsewhere "")."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


def identity() -> dict[str, object]:
    """What a launch record says besides a create time, to read that time elsewhere."""
    return {"boot_time": boot_time(), "boot_id": boot_id()}


def recorded(create_time: float, record: dict[str, object]) -> float | None:
    """A create time that another process recorded (with its `identity()`), taken
    against this process's boot time (the clock may have been stepped since); None if
    it was recorded in another boot: no process of this one has it."""
    its_boot, its_boot_time = record.get("boot_id"), record.get("boot_time")
    if isinstance(its_boot, str) and its_boot != boot_id():
        return None
    if not isinstance(its_boot_time, (int, float)):  # recorded before records said it
        return create_time
    return create_time - its_boot_time + boot_time()


def find(pid: int, create_time: float | None) -> psutil.Process | None:
    """The live process with this pid and create time, or None."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and not _same(pid, create_time):
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
        return create_time is None or not _same(pid, create_time)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot be told


def _same(pid: int, create_time: float) -> bool:
    return abs(created(pid) - create_time) <= _TOLERANCE_S
