"""Machine metrics for the dashboard, as the API reads them.

The leading supervisor records them (`jobs.supervisor.metrics`), a JSON line per sample
in `<data>/history/metrics.jsonl`; every worker reads that file incrementally, so any
worker answers `/api/history`, and the series survives restarts.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from jobs import protocol as p
from runners import forecast


class MachineHistory:
    """The machine's samples the supervisor recorded (what `/api/history` serves, not
    `/metrics`). Reads only what was appended since the last call; starts over after a
    compaction."""

    def __init__(self, path: Path, keep_s: float, interval_s: float) -> None:
        self.path = path
        self._samples: deque[dict[str, Any]] = deque(maxlen=int(keep_s / interval_s) + 60)
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._overlong = False  # within a line too long for a sample
        self._lock = threading.Lock()  # read from several worker threads
        self.problem: str | None = None  # why the file cannot be read, while it cannot

    def read(self, seconds: float) -> list[dict[str, Any]]:
        cutoff = time.time() - seconds
        with self._lock:
            self._catch_up()
            return [s for s in self._samples if s["t"] >= cutoff]

    def last_sample_at(self) -> float | None:
        """When the supervisor took its latest sample; None before its first."""
        with self._lock:
            self._catch_up()
            return float(self._samples[-1]["t"]) if self._samples else None

    def kept(self) -> int:
        """How many samples are kept (on disk, all of them: what a training run reads)."""
        with self._lock:
            self._catch_up()
            return len(self._samples)

    def _catch_up(self) -> None:
        # A folder in its place or a file this user may not read: the chart, the chats'
        # context and the forecast go on without it, and the health says why.
        try:
            self._read_new()
        except FileNotFoundError:
            self.problem = None
        except OSError as exc:  # read from the start once it can be
            self._samples.clear()
            self._offset, self._inode, self._partial, self._overlong = 0, None, b"", False
            self.problem = (f"the machine's history at {self.path} cannot be read "
                            f"({exc.strerror or exc}): the chart, the forecast and training "
                            "go without it. Make it a file this user can read, or remove it: "
                            "the supervisor starts a new one")
        else:
            self.problem = None

    def _read_new(self) -> None:
        st = os.stat(self.path)
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._samples.clear()
            self._offset, self._inode, self._partial, self._overlong = 0, st.st_ino, b"", False
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            while chunk := f.read(forecast.READ_CHUNK):
                self._take(chunk)
            self._offset = f.tell()

    def _take(self, chunk: bytes) -> None:
        """The samples of the lines `chunk` ends; a line too long for a sample (written by
        hand) is not kept in memory while the rest of it is read."""
        *lines, rest = (self._partial + chunk).split(b"\n")
        if self._overlong and lines:  # the end of the line too long: not a sample
            lines, self._overlong = lines[1:], False
        for line in lines:
            sample = forecast.sample_of(line)
            if sample is not None:
                self._samples.append(sample)
        self._overlong = self._overlong or len(rest) > forecast.MAX_SAMPLE_LINE
        self._partial = b"" if self._overlong else rest


def short_job(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the dashboard's recent-jobs list shows it."""
    error = job.get(p.F_ERROR) or {}
    return {
        "id": job.get(p.F_ID), "kind": job.get(p.F_KIND), "state": job.get(p.F_STATE),
        "created_at": job.get(p.F_CREATED_AT), "started_at": job.get(p.F_STARTED_AT),
        "finished_at": job.get(p.F_FINISHED_AT), "queue_position": job.get(p.F_QUEUE_POSITION),
        "progress": job.get(p.F_PROGRESS), "error_type": error.get("type"),
        "resources": job.get(p.F_RESOURCES),
    }


def expert_context(samples: list[dict[str, Any]], counts: dict[str, int]) -> str:
    """A few lines on the recent history, for the chat expert's system prompt."""
    lines = []
    if samples:
        cpu = [float(s["cpu"]) for s in samples]
        mem = [float(s["mem"]) for s in samples]
        minutes = max(1, round((samples[-1]["t"] - samples[0]["t"]) / 60))
        lines.append(f"CPU over the last {minutes} min: average {sum(cpu) / len(cpu):.0f}%, "
                     f"peak {max(cpu):.0f}%, now {cpu[-1]:.0f}%.")
        lines.append(f"Memory: now {mem[-1]:.0f}% used ({samples[-1].get('mem_used_mb', 0):.0f} "
                     f"MB), peak {max(mem):.0f}%.")
    else:
        lines.append("No machine metrics recorded yet.")
    active = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    lines.append(f"Jobs: {active or 'none'}.")
    return "\n".join(lines)
