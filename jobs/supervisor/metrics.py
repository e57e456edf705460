"""Machine metrics for the dashboard, recorded by the leading supervisor about once a
second: one JSON line per sample appended to `<data>/history/metrics.jsonl`, older
samples dropped now and then (`jobs.api.history` reads them)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from jobs import protocol as p


class MetricsRecorder:
    def __init__(self, path: Path, keep_s: float, interval_s: float) -> None:
        self.path = path
        self.keep_s = keep_s
        self.interval_s = interval_s
        self._appended = 0
        # psutil keeps its last CPU reading per thread, and a thread's first reading says
        # 0.0: every reading is taken on this one thread, primed here.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="metrics")
        self._thread.submit(psutil.cpu_percent, None)

    def sample(self) -> dict[str, float]:
        mem = psutil.virtual_memory()
        return {"t": round(time.time(), 3), "cpu": psutil.cpu_percent(interval=None),
                "mem": mem.percent, "mem_used_mb": round(mem.used / 2**20, 1)}

    async def record(self) -> dict[str, float]:
        """Take a sample and append it, on the recorder's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._record)

    def _record(self) -> dict[str, float]:
        """Take a sample and append it; now and then drop what is older than `keep_s`."""
        sample = self.sample()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(sample, separators=(",", ":")).encode() + b"\n"
        with open(self.path, "ab+") as f:  # appended wherever it reads
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a line cut short (a crash, a full disk): ended
                    line = b"\n" + line
            f.write(line)
        # Also at a recorder's first sample: leaders that each lasted less than the
        # 600 would otherwise never drop a line.
        if self._appended % 600 == 0:
            self._compact(sample["t"] - self.keep_s)
        self._appended += 1
        return sample

    def _compact(self, cutoff: float) -> None:
        try:
            with open(self.path, "rb") as f:  # a line that is no UTF-8 is damaged: dropped
                lines = f.readlines()
        except OSError:
            return
        kept = [line for line in lines if _time_of(line) >= cutoff]
        if len(kept) == len(lines):
            return
        p.write_atomic(self.path, b"".join(kept))


def _time_of(line: bytes) -> float:
    try:
        return float(json.loads(line)["t"])
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        return 0.0
