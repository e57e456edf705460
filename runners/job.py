"""The running job as a kind's `execute` sees it: its input, and the ways to report.

Standard library only: this runs in every runner.
"""

from __future__ import annotations

import threading

from jobs import protocol as p
from runners.resources import resources

# Every runner pays for its imports at start: typing stays out of run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class RunnerError(Exception):
    """A failure with a type and a message a user can act on (no traceback shown)."""

    def __init__(self, message: str, error_type: str = p.ErrorType.RUNNER,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        # Another attempt may well succeed (a server refusing, overloaded or failing):
        # the job is retried while it has attempts left.
        self.transient = transient


class Sink:
    """Where a job's reports go: its job file, or the terminal."""

    def changed(self, job: Job) -> None:
        raise NotImplementedError

    def finish(self, job: Job) -> None:
        raise NotImplementedError


OUTPUT_MAX_CHARS = 1_000_000  # a job's output in its job file; a chat's reply is far less
OUTPUT_CUT = f"\n[output cut at {OUTPUT_MAX_CHARS:,} characters: the rest is in the job's log]\n"


class Job:
    """The running job as a runner sees it: its input, and ways to report."""

    def __init__(self, data: dict[str, Any], sink: Sink, data_dir: str | None = None) -> None:
        self.data = data
        self.data_dir = data_dir  # Offload's data folder; None when run without a job file
        self.sink = sink
        self._chunks: list[str] = [data.get(p.F_OUTPUT) or ""]
        self._length = len(self._chunks[0])
        self._cut = False  # past OUTPUT_MAX_CHARS: the rest goes to the log
        self.lock = threading.Lock()

    @property
    def id(self) -> str:
        return str(self.data[p.F_ID])

    @property
    def input(self) -> dict[str, Any]:
        value = self.data.get(p.F_INPUT)
        return value if isinstance(value, dict) else {}

    def number(self, key: str, bounds: tuple[float, float, float], whole: bool = False) -> float:
        """An option of the input, or its default (see `number`)."""
        return number(self.input, key, bounds, whole)

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    @property
    def has_output(self) -> bool:
        return len(self._chunks) > 1 or bool(self._chunks[0])

    def progress(self, fraction: float | None = None, message: str | None = None,
                 along: dict[str, Any] | None = None) -> None:
        """Say how far it is; `along`: the job's own fields that go with it (a loss
        curve), written in the same snapshot, so the two never say different steps."""
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        with self.lock:
            self.data[p.F_PROGRESS] = {"fraction": fraction, "message": message}
            self.data.update(along or {})
        self.sink.changed(self)

    def emit(self, text: str) -> None:
        """Append partial output (a chat's tokens as they stream). Past OUTPUT_MAX_CHARS
        it goes to the log instead: the job file is written again at every change and
        read whole by every follower, so it must stay small. Cut, not shifted: the
        output only ever grows, which the event streams' positions rely on."""
        if not text:
            return
        with self.lock:
            was_cut = self._cut
            kept = "" if was_cut else text[:OUTPUT_MAX_CHARS - self._length]
            if not was_cut:
                self._cut = len(kept) < len(text)
                self._chunks.append(kept + OUTPUT_CUT if self._cut else kept)
                self._length += len(kept)
        if len(kept) < len(text):
            print(text[len(kept):], end="", flush=True)  # the rest, in the log
        if not was_cut:  # once cut, the job file has nothing new to say
            self.sink.changed(self)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.data[p.F_OUTPUT] = "".join(self._chunks)
            self.data[p.F_RESOURCES] = resources()
            return dict(self.data)


def number(options: dict[str, Any], key: str, bounds: tuple[float, float, float],
           whole: bool = False) -> float:
    """An option, or its default; `bounds` is (default, lowest, highest), both ends
    allowed; with `whole`, an int. Any other value is a RunnerError that says why: it
    stops a job, and by hand (a kind's direct input) it is bad usage."""
    default, low, high = bounds
    value = options.get(key, default)
    if (not isinstance(value, (int, float)) or not low <= value <= high
            or (whole and value != int(value))):
        what = "a whole number" if whole else "a number"
        raise RunnerError(f"'{key}' must be {what} from {low:g} to {high:g}")
    return int(value) if whole else float(value)
