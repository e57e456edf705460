"""Final states the supervisor writes for runners that could not: lost, stopped for a
cancel or a deadline, never started. One that cannot be written (an unwritable data
folder) is kept and tried again every pass; the launcher's record of the run is
released only once the final state is on disk.
"""

from __future__ import annotations

import logging
from collections.abc import KeysView
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.launch.base import Launcher, Run

log = logging.getLogger(__name__)


class Finals:
    def __init__(self, jobs_dir: Path) -> None:
        self.dir = jobs_dir
        self.done: set[str] = set()  # jobs known to be final
        self._unwritten: dict[str, tuple[str, str, str, int | None, str | None]] = {}
        self._unreleased: dict[str, tuple[Launcher, Run]] = {}  # ended, final not written

    def pending(self) -> KeysView[str]:
        """Jobs whose final state waits to be written."""
        return self._unwritten.keys()

    def finalize(self, run: Run, job_file: Path, stopping: str | None,
                 launcher: Launcher) -> None:
        """The runner has ended: write the final state it could not, then release it."""
        try:
            self._write_final(run, job_file, stopping, launcher)
        finally:
            if run.job_id in self._unwritten:  # released once it is written
                self._unreleased[run.job_id] = (launcher, run)
            else:
                launcher.release(run)

    def _write_final(self, run: Run, job_file: Path, stopping: str | None,
                     launcher: Launcher) -> None:
        code = launcher.exit_code(run)
        job_id = run.job_id
        try:
            data = p.read_json(job_file)
        except p.CorruptJobFile:
            data = None
        self.done.add(job_id)
        if data is None or data.get(p.F_STATE) in p.FINAL_STATES:
            return  # the runner said how it ended, or the file is gone
        reason = stopping or p.stop_reason(job_file)
        if reason == p.JobState.TIMEOUT:
            message = f"stopped after its deadline of {data.get(p.F_TIMEOUT_S)} s"
            self.finish(job_id, p.JobState.TIMEOUT, p.ErrorType.TIMEOUT, message, data, code)
        elif reason is not None:
            self.finish(job_id, p.JobState.CANCELLED, p.ErrorType.CANCELLED, "cancelled on request",
                        data, code)
        else:
            tail = p.log_tail(job_file)
            message = f"the runner exited without a final state ({launcher.describe_exit(run)})"
            if tail:
                message += f"; last log line: {tail.splitlines()[-1][:300]}"
            self.finish(job_id, p.JobState.FAILED, p.ErrorType.LOST, message, data, code, tail)

    def finish(self, job_id: str, state: str, error_type: str, message: str,
                data: dict[str, Any] | None = None, code: int | None = None,
                tail: str | None = None) -> None:
        job_file = Path(p.job_path(self.dir, job_id))
        if data is None:
            try:
                data = p.read_json(job_file)
            except p.CorruptJobFile:
                return
            if data is None:
                return
            if data.get(p.F_STATE) in p.FINAL_STATES:  # it landed after all
                self._unwritten.pop(job_id, None)
                self.done.add(job_id)
                self._release_later(job_id)
                return
        error: dict[str, Any] = {"type": error_type, "message": message}
        if tail:
            error["log_tail"] = tail
        data.update({p.F_STATE: state, p.F_FINISHED_AT: p.now_iso(), p.F_ERROR: error,
                     p.F_EXIT_CODE: code})
        try:
            p.write_json(job_file, data, durable=True)
        except OSError as exc:
            if job_id not in self._unwritten:
                log.error("job %s: cannot write its final state (%s); retrying", job_id, exc)
            self._unwritten[job_id] = (state, error_type, message, code, tail)
            return
        self._unwritten.pop(job_id, None)
        self.done.add(job_id)
        log.info("job %s: %s (%s)", job_id, state, message)
        self._release_later(job_id)

    def _release_later(self, job_id: str) -> None:
        pending = self._unreleased.pop(job_id, None)
        if pending is not None:
            pending[0].release(pending[1])

    def retry(self, job_ids: set[str]) -> None:
        """Try the final states that could not be written again (`job_ids`: on disk)."""
        for job_id, (state, error_type, message, code, tail) in list(self._unwritten.items()):
            if job_id not in job_ids:
                del self._unwritten[job_id]  # deleted meanwhile
                self._release_later(job_id)
            else:
                self.finish(job_id, state, error_type, message, code=code, tail=tail)
