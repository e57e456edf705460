"""A runner's log kept under OFFLOAD_LOG_MAX_BYTES by the runner itself, as it prints."""

from __future__ import annotations

import os
import sys

from jobs import protocol as p

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

LOG_CHECK_BYTES = 64 * 1024  # a runner with a capped log looks at its size this often


class _CappedOutput:
    """A runner's sys.stdout or sys.stderr when its log is capped: after every
    LOG_CHECK_BYTES of output the log is cut in place past the cap (its start, a
    note, its latest output), so a runner printing without end cannot fill the disk."""

    def __init__(self, stream: TextIO, log_path: str, max_bytes: int,
                 written: list[int]) -> None:
        self._stream = stream
        self._log_path = log_path
        self._max_bytes = max_bytes
        self._written = written  # shared by stdout and stderr: one log file

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._written[0] += len(text)
        if self._written[0] >= LOG_CHECK_BYTES:
            self._written[0] = 0
            self._stream.flush()
            p.cap_log(self._log_path, self._max_bytes)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def cap_output(job_file: str) -> None:
    try:
        max_bytes = int(os.environ.get("OFFLOAD_LOG_MAX_BYTES", ""))
    except ValueError:
        return
    if max_bytes <= 0 or sys.stdout is None or sys.stdout.isatty():
        return
    log_path = p.sibling(job_file, p.LOG_FILE)
    written = [0]
    sys.stdout = _CappedOutput(sys.stdout, log_path, max_bytes, written)
    if sys.stderr is not None:
        sys.stderr = _CappedOutput(sys.stderr, log_path, max_bytes, written)
