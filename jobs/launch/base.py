"""What the supervisor asks of whatever runs its runners: the interface (`Launcher`), the
run it keeps of each job, and the claim that makes a start happen once. The launchers:
`jobs.launch.local` (subprocesses of this machine) and `jobs.launch.ray` (Ray Jobs).

A launcher starts a runner idempotently per job id, tells whether it still runs,
keeps the local job file in step with it, stops it with a grace period, and releases
what the engine keeps of it once the local job file is final. Choose one with
`OFFLOAD_LAUNCHER=local|ray`; the launch record `run.json` names the launcher that
started a job, so a new supervisor adopts it with the same one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import protocol as p

OnExit = Callable[[], None]


class ClaimFailed(OSError):
    """The launch claim (run.json) cannot be written: the data folder is unwritable for
    now, so the job stays queued and nothing starts that could not record itself."""


class CannotStartNow(ClaimFailed):
    """No process or thread can be started now (a limit on processes, or memory): nothing
    started, the claim was taken back, and the job stays queued until there is room."""


def claim(job_file: Path, record: dict[str, Any], durable: bool = True,
          exclusive: bool = False) -> None:
    """Write the launch claim; not `durable`: its runner makes it so (`p.sync_claim`)
    before it runs anything of the job. `exclusive`: FileExistsError where a claim is
    there already (a runner started by hand made its own)."""
    run_file = p.sibling(job_file, p.RUN_FILE)
    try:
        p.write_json(run_file, p.launch_record(job_file, record), durable=durable,
                     exclusive=exclusive)
    except FileExistsError:
        raise
    except OSError as exc:
        raise ClaimFailed(exc.errno, f"cannot write {run_file}: {exc.strerror or exc}") from exc


class ClaimedAlready(Exception):
    """The job was claimed a moment before by a runner started by hand, which this
    launcher cannot watch: it is adopted with the launcher its claim names."""


@dataclass
class Run:
    """One started runner, as its launcher knows it."""

    job_id: str
    job_file: Path
    launcher: str
    started: float | None = None  # wall clock, for the deadline of an adopted run


class Launcher(ABC):
    """What every launcher defines (one lacking an abstract method cannot be
    instantiated, and mypy says so where it is)."""

    name: str

    @abstractmethod
    def start(self, module: str, job_file: Path, data: dict[str, Any], on_exit: OnExit) -> Run:
        """Claim the job (its run.json, written before anything runs; ClaimFailed if it
        cannot be), then start its runner; a second call for the same job starts
        nothing. `on_exit` is called (from any thread) when the runner has ended."""

    @abstractmethod
    def adopt(self, job_file: Path, record: dict[str, Any], data: dict[str, Any],
              on_exit: OnExit) -> Run:
        """Watch a runner that an earlier supervisor started (`record` is its run.json)."""

    @abstractmethod
    def is_alive(self, run: Run) -> bool: ...

    # release and close are optional: by default they do nothing.
    @abstractmethod
    def stop(self, run: Run, grace_s: float) -> None:
        """Stop the runner and everything it started; returns once it is gone."""

    @abstractmethod
    def exit_code(self, run: Run) -> int | None: ...

    @abstractmethod
    def describe_exit(self, run: Run) -> str:
        """How the runner ended, for a job that ended without a final state."""

    def problem(self) -> str | None:
        """What keeps this launcher from running jobs now, in words (None: nothing
        known), for /api/health."""
        return None

    def release(self, run: Run) -> None:  # noqa: B027
        """Called once the local job file is final."""

    def leading(self) -> None:  # noqa: B027
        """This supervisor now leads the data folder: what a launcher does once for it."""

    def close(self) -> None:  # noqa: B027
        """The supervisor leaves: stop watching (runners keep running)."""
