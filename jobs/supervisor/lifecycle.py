"""One job's life on the supervisor's side: start -> watch -> stop -> finalize -> release.

The supervisor keeps a `JobLife` for each job it launched or adopted and drives its
steps every pass; what is about all jobs (the queue, the cap, leadership, pruning)
stays with the supervisor.

- start: the launcher claims the job in its run.json before anything runs (so a job
  never runs twice; a claim that cannot be written raises `ClaimFailed` and the job
  stays queued), then starts its runner. A runner that an earlier supervisor started
  is adopted instead, by the launcher its run.json names.
- watch: whether the runner has ended, and whether it is past its deadline.
- stop: for a cancel or a deadline, on a thread of its own (it waits out a grace period).
- finalize: the final state the runner could not write (lost, stopped) is written
  here. One that cannot be written (an unwritable data folder) is kept and tried again
  every pass (`retry`). A lost runner, or one that left a transient failure recorded
  without a final state (it exits with `p.EXIT_RETRY`, for one reading its log), is not
  final while its job has attempts left: the job is queued again under the same id, to
  start after a backoff (`requeued`); where that cannot be written (a full disk), it is
  kept and tried again every pass in the same way, not ended in its stead.
- release: what the launcher keeps of the run, once the final state is on disk.

A job cancelled or refused before it started has a life without a run: only a final
state to write (`finish`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from jobs import protocol as p
from jobs.launch.base import ClaimFailed, Launcher, OnExit, Run
from jobs.protocol.counters import take_removed_note

log = logging.getLogger(__name__)

STOP_RETRY_S = 5.0  # a stop that raised is tried again after this


class Final(NamedTuple):
    """A final state the supervisor writes into a job file."""

    state: str
    error_type: str
    message: str
    code: int | None = None
    tail: str | None = None


class JobLife:
    """One launched (or adopted, or refused) job, as the supervisor drives it."""

    def __init__(self, job_id: str, job_file: Path, launcher: Launcher,
                 run: Run | None = None, deadline: float | None = None) -> None:
        self.job_id = job_id
        self.job_file = job_file
        self.launcher = launcher
        self._run = run
        self.deadline = deadline  # time.monotonic() value
        self.stopping: str | None = None  # the reason, once a stop has begun
        self.stop_failed_at: float | None = None  # the last stop raised then: tried again
        self._stop_failure_said = False
        self.unwritten: Final | None = None  # to write again next pass
        # The job as its runner left it, its exit code and backoff: queued again next pass.
        self._unqueued: tuple[dict[str, Any], int | None, float] | None = None
        self.is_final = False  # the job file needs nothing more from the supervisor
        self.requeued: dict[str, Any] | None = None  # the job file, queued again for a retry
        self.final_job: dict[str, Any] | None = None  # the job as it ended, to count once
        self._ended = False  # finalized: release once the final state is on disk
        self._released = False
        self._stop_unrecorded = False  # its deadline's stop request could not be written
        self._stop_written_late: float | None = None  # when it was, once it could be

    @property
    def run(self) -> Run:
        assert self._run is not None, f"job {self.job_id} has no runner"
        return self._run

    # -- start ---------------------------------------------------------------------

    def start(self, module: str, data: dict[str, Any], on_exit: OnExit) -> bool:
        """Claim the job and start its runner; False if it could not start (its final
        state says why). Raises ClaimFailed if the claim cannot be written now."""
        try:
            self._run = self.launcher.start(module, self.job_file, data, on_exit)
        except ClaimFailed:
            raise  # nothing started: the job stays queued
        except OSError as exc:
            log.error("job %s: cannot start its runner: %s", self.job_id, exc)
            self.finish(p.JobState.FAILED, p.ErrorType.RUNNER, f"cannot start the runner: {exc}")
            return False
        timeout = data.get(p.F_TIMEOUT_S)
        if isinstance(timeout, (int, float)) and timeout > 0:
            self.deadline = time.monotonic() + float(timeout)
        return True

    @classmethod
    def adopt(cls, job_id: str, job_file: Path, data: dict[str, Any],
              launcher_for: Callable[[dict[str, Any]], Launcher], on_exit: OnExit) -> JobLife:
        """A job an earlier supervisor launched: `launcher_for` gives the launcher its
        run.json names. Whether the runner still runs is for `has_ended` to say."""
        record = p.read_json_or_none(p.sibling(job_file, p.RUN_FILE)) or {}
        elsewhere = p.launched_elsewhere(job_file, record)
        if elsewhere is not None:
            # Its runner (if any still runs) writes that file, not this one: never ours.
            log.warning("job %s: its runner was started for %s (this data folder is a copy "
                        "or was moved): lost here", job_id, elsewhere)
            record, data = {}, {}
        try:
            launcher = launcher_for(record)
            run = launcher.adopt(job_file, record, data, on_exit)
        except (OSError, ValueError) as exc:
            log.warning("job %s: cannot adopt its runner: %s", job_id, exc)
            launcher = launcher_for({})
            run = launcher.adopt(job_file, {}, {}, on_exit)  # nothing to find: lost
        deadline = None
        timeout = data.get(p.F_TIMEOUT_S)
        if isinstance(timeout, (int, float)) and timeout > 0 and run.started is not None:
            deadline = time.monotonic() + (run.started + float(timeout) - time.time())
        return cls(job_id, job_file, launcher, run, deadline)

    # -- watch ---------------------------------------------------------------------

    def has_ended(self) -> bool:
        return not self.launcher.is_alive(self.run)

    def is_overdue(self, now: float) -> bool:
        """Past its deadline and not stopping yet (`now`: time.monotonic())."""
        return self.may_stop and self.deadline is not None and now > self.deadline

    @property
    def may_stop(self) -> bool:
        """No stop under way: none begun, or the last one failed STOP_RETRY_S ago."""
        return self.stopping is None or (self.stop_failed_at is not None
                                         and time.monotonic() > self.stop_failed_at + STOP_RETRY_S)

    # -- stop ----------------------------------------------------------------------

    def stop_reason(self) -> str:
        """Why its stop file asks it to stop."""
        return p.stop_reason(self.job_file) or p.JobState.CANCELLED

    @property
    def timeout_held(self) -> bool:
        """Whether its deadline's stop request, written late, waits for the runner's final
        state (see `request_timeout`): its stop file is not acted on meanwhile."""
        return self._stop_written_late is not None

    def request_timeout(self, now: float, patience_s: float) -> bool:
        """Its stop file says `timeout`, for the runner and the API to see why; whether to
        stop the runner now (`now`: time.monotonic()). While the request cannot be written
        (an unwritable data folder), neither can the runner's final state: a runner whose
        work ended in time is waiting to write it (`patience_s`, as runners are told), and
        stopping it would lose its result for a `timeout`. It is stopped once the request
        is written, or that long after its deadline (one that is not ending by itself).
        Written late, the request waits a little more: the runner's final state could be
        written from the same moment, and a runner stopped before its next try
        (`p.FINAL_RETRY_S`, past a stop's grace) lost it all the same."""
        if self._stop_written_late is not None:
            return now > self._stop_written_late + 2 * p.FINAL_RETRY_S
        try:
            p.request_stop(self.job_file, p.JobState.TIMEOUT)
            if not self._stop_unrecorded:
                return True
            self._stop_written_late = now
            return False
        except OSError as exc:
            if not self._stop_unrecorded:
                log.warning("job %s: past its deadline, but cannot write the stop request "
                            "(%s): its runner is stopped once it can be written, or %g s "
                            "after its deadline", self.job_id, exc, patience_s)
                self._stop_unrecorded = True
            return self.deadline is None or now > self.deadline + patience_s

    def begin_stop(self, reason: str, grace_s: float,
                   then: Callable[[], None]) -> threading.Thread:
        """Stop the runner on a thread of its own; `then` is called once it is gone."""
        self.stopping, self.stop_failed_at = self.stopping or reason, None
        thread = threading.Thread(target=self.stop, args=(grace_s, then), daemon=True,
                                  name=f"stop-{self.job_id[:8]}")
        thread.start()
        return thread

    def stop(self, grace_s: float, then: Callable[[], None]) -> None:
        try:
            self.launcher.stop(self.run, grace_s)
        except Exception:
            if not self._stop_failure_said:
                self._stop_failure_said = True
                log.exception("job %s: stopping its runner failed; tried again every %g s",
                              self.job_id, STOP_RETRY_S)
            # Its reason kept: the runner may have stopped all the same.
            self.stop_failed_at = time.monotonic()
        then()

    # -- finalize ------------------------------------------------------------------

    @property
    def waits_for_room(self) -> bool:
        """Whether its final state, or its job queued again, waits to be written."""
        return self.unwritten is not None or self._unqueued is not None

    @property
    def runs_again(self) -> bool:
        """Whether its job, queued again for its next attempt, waits to be written."""
        return self._unqueued is not None

    def finalize(self, backoff: Callable[[int], float] = lambda attempt: 0.0) -> None:
        """The runner has ended: write the final state it could not (or queue its job
        again, `backoff(attempt)` seconds from now), then release it."""
        try:
            self._write_missing_final(backoff)
        finally:
            self._ended = True
            if not self.waits_for_room:
                self.release()  # else once the retry writes it

    def _write_missing_final(self, backoff: Callable[[int], float]) -> None:
        code = self.launcher.exit_code(self.run)
        data = p.read_json_or_none(self.job_file)
        if data is None:  # removed as its runner ended (its end still to count), or by hand
            data = take_removed_note(self.job_file)
        self.is_final = True
        if data is None or data.get(p.F_STATE) in p.FINAL_STATES:
            self.final_job = data
            if data is not None:  # said as the ends written here are: one line a job's end
                error = data.get(p.F_ERROR)
                log.info("job %s: %s%s", self.job_id, data.get(p.F_STATE),
                         f" ({error.get('type')})" if isinstance(error, dict) else "")
            return  # the runner said how it ended, or the file is gone
        if code is None and isinstance(data.get(p.F_EXIT_CODE), int):
            code = data[p.F_EXIT_CODE]  # an adopted runner's, as it wrote it (75: not final)
        self._end(data, code, backoff(p.attempts(data)[0]))

    def _end(self, data: dict[str, Any], code: int | None, delay_s: float) -> None:
        """Write how the runner ended (`data`: its job file as it left it): stopped, queued
        again `delay_s` from now if it has attempts left, else failed."""
        reason = self.stopping or p.stop_reason(self.job_file)
        if reason is not None:
            error = p.stop_error(reason, data.get(p.F_TIMEOUT_S))
            state = p.JobState.TIMEOUT if reason == p.JobState.TIMEOUT else p.JobState.CANCELLED
            self._unqueued = None  # cancelled while it waited to be queued again: not run
            self._write(Final(state, error["type"], error["message"], code), data)
            return
        attempt, most = p.attempts(data)
        if attempt < most:
            self._requeue(data, code, self._failure(data, code, attempt + 1), delay_s)
        else:
            self._write(self._failure(data, code), data)

    def _failure(self, data: dict[str, Any], code: int | None,
                 next_attempt: int | None = None) -> Final:
        """Why a runner ended without a final state: the transient error it recorded
        (it left the retry to the supervisor), else it was lost; said for the job queued
        again for `next_attempt`, or (None) ending with it."""
        error = data.get(p.F_ERROR)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return Final(p.JobState.FAILED, str(error.get("type") or p.ErrorType.RUNNER),
                         error["message"], code)
        tail = p.log_tail(self.job_file)
        message = ("the runner exited without a final state "
                   f"({self.launcher.describe_exit(self.run)})")
        if code == p.EXIT_NO_ROOM:
            then = (", then run the job again" if next_attempt is None else
                    ": the job is queued again by itself (attempt "
                    f"{next_attempt} of {p.attempts(data)[1]})")
            message = ("the runner waited for room on the data folder's disk to write its "
                       "final state until it gave up: its outcome is lost; free some space "
                       f"on it{then}")
        if tail:
            message += f"; last log line: {tail.splitlines()[-1][:300]}"
        return Final(p.JobState.FAILED, p.ErrorType.LOST, message, code, tail)

    def _requeue(self, data: dict[str, Any], code: int | None, failure: Final,
                 delay_s: float) -> None:
        """Queue the job again for its next attempt, `delay_s` from now; kept to try again
        next pass if it cannot be written (a cancel meanwhile ends it instead)."""
        original = data
        attempt, _ = p.attempts(data)
        earlier = data.get(p.F_EARLIER_ERRORS)
        earlier = list(earlier) if isinstance(earlier, list) else []
        earlier.append({"attempt": attempt, "type": failure.error_type,
                        "message": failure.message, "finished_at": p.now_iso()})
        wait = math.ceil(delay_s)
        data = dict(data)  # the original stays as it was, should this fail
        data.update({
            p.F_STATE: p.JobState.QUEUED, p.F_ATTEMPT: attempt + 1,
            p.F_RUN_AT: p.iso(time.time() + delay_s), p.F_EARLIER_ERRORS: earlier,
            p.F_OUTPUT: "", p.F_RESULT: None, p.F_ERROR: None, p.F_STARTED_AT: None,
            p.F_FINISHED_AT: None, p.F_PID: None, p.F_EXIT_CODE: None, p.F_RESOURCES: None,
            p.F_PROGRESS: {"fraction": None,
                           "message": f"retrying in {wait} s: {failure.message}"[:500]},
        })
        try:
            # The claim goes first: a supervisor that dies before the write below finds a
            # running job without a claim, takes it as lost, and decides again.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p.sibling(self.job_file, p.RUN_FILE))
            p.write_json(self.job_file, data, durable=True)
        except OSError as exc:
            if self._unqueued is None:
                log.error("job %s: cannot queue it again for its next attempt (%s); "
                          "retrying", self.job_id, exc)
            self._unqueued = (original, code, delay_s)
            self.is_final = False
            return
        self._unqueued = None
        # Its type, not its message: that may quote the user's chat, or what a server sent
        # back; it stays in the job file, deleted with the job.
        log.info("job %s: attempt %d failed (%s); attempt %d in %.1f s", self.job_id,
                 attempt, failure.error_type, attempt + 1, delay_s)
        self.is_final = False
        self.requeued = data

    def finish(self, state: str, error_type: str, message: str) -> None:
        """End a job that has no runner (cancelled or refused before it started)."""
        self._write(Final(state, error_type, message))

    def write_held(self) -> None:
        """Try the final state (or the job queued again) that could not be written again."""
        if self._unqueued is not None:
            self._end(*self._unqueued)
            if not self.waits_for_room:
                self.release()
        elif self.unwritten is not None:
            self._write(self.unwritten)

    def _write(self, final: Final, data: dict[str, Any] | None = None) -> None:
        """Write `final` over `data` (None: the job file as it is now, left alone if it
        is final already); kept in `unwritten` if the write fails."""
        if data is None:
            data = p.read_json_or_none(self.job_file)
            if data is None:
                return
            if data.get(p.F_STATE) in p.FINAL_STATES:  # it landed after all
                self._on_disk(data)
                return
        error: dict[str, Any] = {"type": final.error_type, "message": final.message}
        if final.tail:
            error["log_tail"] = final.tail
        data.update({p.F_STATE: final.state, p.F_FINISHED_AT: p.now_iso(), p.F_ERROR: error,
                     p.F_EXIT_CODE: final.code})
        try:
            p.write_json(self.job_file, data, durable=True)
        except OSError as exc:
            if self.unwritten is None:
                log.error("job %s: cannot write its final state (%s); retrying",
                          self.job_id, exc)
            self.unwritten = final
            return
        log.info("job %s: %s (%s)", self.job_id, final.state, final.error_type)  # as above
        self._on_disk(data)

    def _on_disk(self, data: dict[str, Any]) -> None:
        self.final_job = data
        self.unwritten = None
        self.is_final = True
        if self._ended:
            self.release()

    # -- release -------------------------------------------------------------------

    def release(self) -> None:
        """Let the launcher drop what it keeps of an ended run (once, and only once
        its final state is on disk or its job is gone)."""
        if self._run is None or not self._ended or self._released:
            return
        self._released = True
        self.launcher.release(self._run)
