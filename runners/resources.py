"""A runner's CPU seconds and peak memory, reported with every write of its job file."""

from __future__ import annotations

import sys

if sys.platform != "win32":
    # At import, so that the fork server has it loaded, not each runner it forks.
    import resource


def resources() -> dict[str, float] | None:
    """CPU seconds and peak RSS of this runner (and the children it waited for)."""
    if sys.platform == "win32":
        return _resources_psutil()
    else:  # a branch of its own: the type checker knows `resource` only off Windows
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        peak = _peak_rss_linux()
        if peak is None:
            unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
            peak = own.ru_maxrss * unit / 2**20
        return {"cpu_s": round(cpu, 3), "peak_rss_mb": round(peak, 1)}


def _peak_rss_linux() -> float | None:
    # VmHWM restarts at exec; ru_maxrss would still count the fork server's pages.
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _resources_psutil() -> dict[str, float] | None:
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    times = proc.cpu_times()
    mem = proc.memory_info()
    peak = getattr(mem, "peak_wset", mem.rss)
    return {"cpu_s": round(times.user + times.system, 3), "peak_rss_mb": round(peak / 2**20, 1)}
