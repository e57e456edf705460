"""Runners as Ray Jobs: the same `python -m runners.<kind>` command, run on a Ray
cluster through its Jobs REST API (`jobs.launch.ray_client`; no `import ray` here).

- Submission id `offload-<job id>`: a start looks the job up first and counts Ray's
  "already exists" as submitted, so a job never runs twice.
- The job's JSON travels in the job's environment (`remote.job_env`), not on the
  command line every account on the node can read. The runner prints each snapshot of
  its job as one tagged line on stdout (`remote.snapshot_line`), throttled like its file
  writes, the final one always.
  Each launch has its own random key, sent in the job's environment and kept in its
  launch record (for an adopting supervisor): only lines with it are snapshots, so
  nothing the job prints (its input, a model's reply) can stand in for its state.
- One poller thread per remote job reads the job's status and log from Ray and is the
  only writer of the local job file and log while the job runs. Ray's Jobs API serves
  a log only whole (`GET /api/jobs/<id>/logs`: no offset; its tail is a WebSocket), so
  the poller parses only what is new since its last look and appends that to the
  local log, which it caps as a local runner's is capped. When Ray reports the
  job ended without a final snapshot, the supervisor writes its final state from
  Ray's status and exit code, as for a local runner that died, and then releases
  (deletes) Ray's record.
- Deadlines and cancels are Offload's: Ray has no run-time limit. Ray's stop sends
  SIGTERM to the runner's process group, then SIGKILL after a few seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.kinds import runner_modules
from jobs.launch.base import ClaimedAlready, Launcher, OnExit, Run, claim
from jobs.launch.ray_client import (
    RayError,
    RayJob,
    RayJobNotFound,
    RayJobsClient,
    RayJobStatus,
    RayRefused,
    RayUnavailable,
)
from jobs.protocol import remote
from jobs.protocol.remote import REMOTE_FLAG, job_env
from jobs.settings import (
    RAY_DELETE_PAUSES_S,
    RAY_DELETED_LOOKS_S,
    RAY_END_LOOK_S,
    RAY_END_WAIT_S,
    RAY_ENV_MAX_CHARS,
    RAY_PENDING_STOP_S,
    RAY_POLL_S,
    RAY_UNREACHABLE_S,
    Settings,
    is_loopback,
    is_secret_env,
)

log = logging.getLogger(__name__)

SUBMISSION_PREFIX = "offload-"
SUBMITTED = "submitted"  # in run.json, once Ray has the job
FOLDER_MARK = "offload_folder"  # in a run's metadata in Ray: which data folder sent it
_RAY_ECHO = "Running entrypoint for job "


def submission_id(job_id: str, attempt: int = 1) -> str:
    """Ray's id of a job's run; a retried job's later attempts are new submissions."""
    return SUBMISSION_PREFIX + job_id + (f"-{attempt}" if attempt > 1 else "")


@dataclass
class RemoteRun(Run):
    submission_id: str = ""
    key: str = ""  # the launch's snapshot key: lines without it are the job's output
    seq: int = 0  # the last snapshot written to the local job file
    consumed: int = 0  # characters of Ray's log already parsed
    logged: bool = False  # this poller has written the local log (later writes append)
    ended: threading.Event = field(default_factory=threading.Event)
    to_submit: tuple[str, dict[str, Any]] | None = None  # (module, job) until submitted
    stop_asked: bool = False
    stop_sent_at: float | None = None  # time.monotonic() when Ray took the stop
    code: int | None = None
    how: str = ""


class RayLauncher(Launcher):
    name = p.RAY

    def __init__(self, address: str, runner_env: dict[str, str] | None = None, *,
                 python: str | None = None, num_cpus: float = 1.0, train_gpus: float = 0.0,
                 poll_s: float = RAY_POLL_S, log_max_bytes: int | None = None,
                 jobs_dir: Path | None = None) -> None:
        """`jobs_dir`: the data folder's jobs: its runs are marked as its own in Ray, and
        their records an earlier start left are deleted once this one leads (`leading`)."""
        self.client = RayJobsClient(address)
        self.address = self.client.address
        self.local_head = is_loopback(self.client.host)
        # On a head of this machine, this very interpreter; on a cluster, the nodes' own.
        self.python = python or (sys.executable if self.local_head else "python3")
        self.num_cpus = num_cpus
        self.train_gpus = train_gpus
        self.poll_s = poll_s
        self.log_max_bytes = log_max_bytes  # of the local copy of a job's log
        self.env = {k: v for k, v in (runner_env or {}).items() if not is_secret_env(k, v)}
        self.env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
        if self.local_head:
            self.env["PYTHONPATH"] = p.ROOT  # the project, wherever Ray starts the job
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._runs: dict[str, RemoteRun] = {}  # watched here, by job id
        self._unreachable: dict[str, str] = {}  # job id -> why its poller cannot reach Ray
        self.jobs_dir = jobs_dir
        # Schedules' job ids are the same in every data folder: the folder's own mark.
        self.folder_mark = None if jobs_dir is None else hashlib.sha256(
            f"{socket.gethostname()}\n{jobs_dir.resolve()}".encode()).hexdigest()[:16]

    @classmethod
    def from_settings(cls, settings: Settings) -> RayLauncher:
        return cls(settings.ray_address, settings.runner_env(), python=settings.ray_python,
                   num_cpus=settings.ray_num_cpus, train_gpus=settings.ray_train_gpus,
                   log_max_bytes=settings.log_max_bytes, jobs_dir=settings.jobs_dir)

    # -- the launcher interface -----------------------------------------------------

    def start(self, module: str, job_file: Path, data: dict[str, Any], on_exit: OnExit) -> Run:
        """Claims the job in run.json; its poller submits it (a submission takes Ray a
        few hundred milliseconds: the supervisor's pass does not wait for it)."""
        job_id = p.id_of(job_file)
        with self._lock:
            watched = self._runs.get(job_id)
            if watched is not None and not watched.ended.is_set():
                return watched
            sid, key = submission_id(job_id, p.attempts(data)[0]), secrets.token_hex(16)
            try:
                claim(job_file, self._record(sid, key), exclusive=True)
            except FileExistsError:  # a runner started by hand claimed it a moment before
                raise ClaimedAlready(job_id) from None
            run = RemoteRun(job_id, job_file, self.name, time.time(), sid, key,
                            to_submit=(module, data))
            self._runs[job_id] = run
        return self._watch(run, on_exit)

    def adopt(self, job_file: Path, record: dict[str, Any], data: dict[str, Any],
              on_exit: OnExit) -> Run:
        job_id = p.id_of(job_file)
        launched = record.get("launched_ns")
        # Claimed by a supervisor that stopped before Ray had it (Ray unreachable, say):
        # sent now, as it would have been (looked up first, as every submission is).
        module = runner_modules().get(str(data.get(p.F_KIND)))
        unsent = (module, data) if module is not None and not record.get(SUBMITTED) \
            and data.get(p.F_STATE) == p.JobState.QUEUED else None
        with self._lock:
            watched = self._runs.get(job_id)
            if watched is not None and not watched.ended.is_set():
                return watched
            # An unsent job's deadline counts from its sending, as any job's on Ray.
            started = time.time() if unsent else (
                launched / 1e9 if isinstance(launched, int) else None)
            run = RemoteRun(job_id, job_file, self.name, started,
                            str(record.get("submission_id")
                                or submission_id(job_id, p.attempts(data)[0])),
                            str(record.get("snapshot_key") or ""), to_submit=unsent,
                            stop_asked=unsent is not None and p.stop_reason(job_file) is not None)
            self._runs[job_id] = run
        # Its poller reads Ray's whole log again: the log file is rebuilt, and the
        # latest snapshot rewritten (the newest there is, never an older one).
        return self._watch(run, on_exit)

    def is_alive(self, run: Run) -> bool:
        return not _remote(run).ended.is_set()

    def sync(self, run: Run) -> None:
        """One look at Ray: new snapshots into the job file, new text into its log."""
        ray_run = _remote(run)
        if ray_run.to_submit is not None:
            if ray_run.stop_asked:
                self._end(ray_run, None, "stopped before it was sent to Ray")
                return
            module, data = ray_run.to_submit
            if self._lookup(ray_run.submission_id) is None:  # idempotent: look up first
                self._submit(ray_run.submission_id, ray_run.key, module, data)
            ray_run.to_submit = None
            self._say_submitted(ray_run)
        if ray_run.stop_asked and ray_run.stop_sent_at is None:
            # Asked while it was being submitted, or while Ray did not answer: sent until
            # Ray takes it (a RayError here is the poller's, as any look's).
            self._send_stop(ray_run)
        try:
            info = self.client.info(ray_run.submission_id)
        except RayJobNotFound:
            self._end(ray_run, None, f"the Ray cluster at {self.address} no longer knows job "
                                    f"{ray_run.submission_id}: its head restarted (which loses "
                                    "job records and logs) or the job was deleted there")
            return
        if info.status != RayJobStatus.PENDING:
            self._apply_log(ray_run, self.client.logs(ray_run.submission_id))
        elif (ray_run.stop_sent_at is not None
              and time.monotonic() - ray_run.stop_sent_at > RAY_PENDING_STOP_S):
            # Ray stops a job it has no place for (or whose worker cannot start) only once
            # it runs: it never started, so it ends here (its record goes once Ray has
            # ended it: `_delete` waits for that).
            self._end(ray_run, None, "stopped while Ray still had it waiting to start")
            return
        if info.terminal:
            self._end(ray_run, info.exit_code, _describe(info))

    def stop(self, run: Run, grace_s: float) -> None:
        ray_run = _remote(run)
        ray_run.stop_asked = True  # not submitted yet: its poller will not, or stops it
        try:
            self._send_stop(ray_run)
        except RayError as exc:  # Ray down: its poller sends the stop once Ray answers
            log.warning("job %s: cannot ask Ray to stop it now (asked again as its poller "
                        "reaches Ray): %s", run.job_id, exc)
        # Ray: SIGTERM, then SIGKILL after its own grace; its poller sees the end.
        deadline = time.monotonic() + grace_s + 10
        while not ray_run.ended.wait(0.05) and not self._closing.is_set():
            if time.monotonic() > deadline:
                break

    def _send_stop(self, run: RemoteRun) -> None:
        """Ask Ray to stop the job; RayError if it did not take the stop."""
        if run.to_submit is not None:
            return  # not sent yet: its poller never sends it
        try:
            self.client.stop(run.submission_id)
        except RayJobNotFound:
            pass  # gone already: its poller says how it ended
        if run.stop_sent_at is None:
            run.stop_sent_at = time.monotonic()

    def exit_code(self, run: Run) -> int | None:
        return _remote(run).code

    def describe_exit(self, run: Run) -> str:
        return _remote(run).how or "ended in Ray"

    def release(self, run: Run) -> None:
        sid = _remote(run).submission_id
        with self._lock:
            self._runs.pop(run.job_id, None)
        # Off the caller's thread: a busy head may take the whole HTTP timeout to answer.
        threading.Thread(target=self._delete, args=(sid,), daemon=True,
                         name=f"ray-delete-{run.job_id[:8]}").start()

    def leading(self) -> None:
        if self.jobs_dir is not None:
            threading.Thread(target=self._sweep, args=(self.jobs_dir,), daemon=True,
                             name="ray-sweep").start()

    def _sweep(self, jobs_dir: Path) -> None:
        """Delete the records an earlier start left in Ray (it stopped while deleting
        them, or Ray wrote one again after): runs of this folder (by its mark) whose jobs
        have ended here, or been tried again. A run still going there is stopped first:
        its job ended here, and nothing watches it."""
        try:
            records = self.client.jobs()
        except RayError as exc:
            log.info("cannot list Ray's jobs to delete those left by an earlier start: %s", exc)
            return
        for info in records:
            if self._closing.is_set():
                return
            if info.metadata.get(FOLDER_MARK) != self.folder_mark:
                continue  # another folder's, or Ray's other users'
            try:
                if self._left_here(jobs_dir, info.submission_id):
                    self._sweep_one(info)
            except Exception:  # one record's surprise leaves the others to delete
                log.exception("job %s: cannot delete Ray's record left by an earlier start",
                              info.submission_id)

    def _left_here(self, jobs_dir: Path, sid: str) -> bool:
        """Whether Ray's record `sid` is of a run no one here watches, of a job that has
        ended here or gone on to a later attempt."""
        attempt = _attempt_here(jobs_dir, sid)
        if attempt is None:
            return False
        job_file, tried = attempt
        data = p.read_json_or_none(job_file)
        if data is None:
            return False
        state = data.get(p.F_STATE)
        ended = (isinstance(state, str) and state in p.FINAL_STATES) or p.attempts(data)[0] > tried
        with self._lock:
            watched = any(run.submission_id == sid for run in self._runs.values())
        return ended and not watched

    def _sweep_one(self, info: RayJob) -> None:
        log.info("job %s: deleting Ray's record left by an earlier start", info.submission_id)
        if info.terminal:
            self._delete_once(info.submission_id)
            return
        with contextlib.suppress(RayError):
            self.client.stop(info.submission_id)
        # Deleted once Ray has ended it, as a run released here is.
        threading.Thread(target=self._delete, args=(info.submission_id,), daemon=True,
                         name=f"ray-delete-{info.submission_id[8:16]}").start()

    def _delete(self, sid: str) -> None:
        """Delete Ray's record of an ended job, trying again while the head fails, and
        again where Ray writes it anew (as its supervisor actor dies)."""
        if not self._ended_in_ray(sid) or not self._delete_once(sid):
            return
        for pause in RAY_DELETED_LOOKS_S:
            if self._closing.wait(pause):
                return
            try:
                back = self._lookup(sid) is not None
            except RayError:
                return  # looked for no more: a record left is only a record
            if back and not self._delete_once(sid):
                return

    def _ended_in_ray(self, sid: str) -> bool:
        """Whether Ray has ended the job, or holds no record of it: it deletes no other. A
        job stopped while Ray had it waiting ends there once it can run, or at Ray's own
        start timeout (15 min by default)."""
        deadline = time.monotonic() + RAY_END_WAIT_S
        while True:
            try:
                info = self._lookup(sid)
            except RayError:
                return True  # the delete tries again while the head fails, and says so
            if info is None or info.terminal:
                return True
            if time.monotonic() > deadline:
                log.warning("job %s: Ray has not ended it after %.0f s; its record is left "
                            "there", sid, RAY_END_WAIT_S)
                return False
            if self._closing.wait(RAY_END_LOOK_S):
                return False

    def _delete_once(self, sid: str) -> bool:
        """Whether Ray's record of `sid` is deleted (or was not there)."""
        for pause in (*RAY_DELETE_PAUSES_S, None):
            try:
                self.client.delete(sid)
                return True
            except RayJobNotFound:
                return True  # deleted already
            except RayError as exc:
                if pause is None:
                    log.warning("job %s: Ray's record not deleted after %d tries: %s",
                                sid, len(RAY_DELETE_PAUSES_S) + 1, exc)
                    return False
                log.info("job %s: Ray's record not deleted (%s); trying again", sid, exc)
            if self._closing.wait(pause):
                return False
        return False

    def close(self) -> None:
        self._closing.set()

    def problem(self) -> str | None:
        with self._lock:
            if not self._unreachable:
                return None
            waiting = len(self._unreachable)
            said = next(iter(self._unreachable.values()))
        return (f"{said}; {waiting} job{'s' if waiting > 1 else ''} waiting for it, each lost "
                f"after {RAY_UNREACHABLE_S:.0f} s (is OFFLOAD_RAY_ADDRESS the Ray dashboard's "
                "address, and is its head running?)")

    # -- polling --------------------------------------------------------------------

    def _watch(self, run: RemoteRun, on_exit: OnExit) -> RemoteRun:
        threading.Thread(target=self._poll, args=(run, on_exit), daemon=True,
                         name=f"ray-{run.job_id[:8]}").start()
        return run

    def _poll(self, run: RemoteRun, on_exit: OnExit) -> None:
        try:
            self._poll_until_ended(run, on_exit)
        finally:
            with self._lock:
                self._unreachable.pop(run.job_id, None)

    def _poll_until_ended(self, run: RemoteRun, on_exit: OnExit) -> None:
        failing_since: float | None = None
        while not self._closing.is_set() and not run.ended.is_set():
            try:
                self.sync(run)
                if failing_since is not None:
                    log.info("job %s: Ray answers again", run.job_id)
                failing_since = None
                with self._lock:
                    self._unreachable.pop(run.job_id, None)
            except OSError as exc:  # RayError too; a local write may also fail
                with self._lock:  # another error: Ray answered, or this side failed
                    if isinstance(exc, RayUnavailable):
                        self._unreachable[run.job_id] = str(exc)
                    else:
                        self._unreachable.pop(run.job_id, None)
                if run.to_submit is not None and isinstance(exc, RayRefused):
                    self._refused(run, f"never started: {exc}")
                elif run.to_submit is not None and isinstance(exc, RayError) \
                        and not isinstance(exc, RayUnavailable):
                    self._end(run, None, f"never started: {exc}")  # Ray failed: tried again
                elif failing_since is None:  # said once: it polled the log full, 5 a second
                    failing_since = time.monotonic()
                    log.warning("job %s: %s; trying again for up to %.0f s", run.job_id, exc,
                                RAY_UNREACHABLE_S)
                elif time.monotonic() - failing_since > RAY_UNREACHABLE_S:
                    self._end(run, None, f"{exc}; for more than {RAY_UNREACHABLE_S:.0f} s")
            if run.ended.is_set():
                on_exit()
                return
            self._closing.wait(self.poll_s)

    def _apply_log(self, run: RemoteRun, text: str) -> None:
        end = text.rfind("\n", run.consumed) + 1  # complete lines only
        if end <= run.consumed:
            return
        snapshots, plain = remote.split_snapshots(text[run.consumed:end], run.key)
        # Ray echoes the entrypoint, encoded job and all: noise in the job's log.
        plain = "".join(line for line in plain.splitlines(keepends=True)
                        if not line.startswith(_RAY_ECHO))
        if plain:
            self._append_log(run, plain)  # if it fails, the next poll reads these lines again
        run.consumed = end
        fresh = [(seq, data) for seq, data in snapshots if seq > run.seq]
        if fresh:
            run.seq, latest = fresh[-1]
            p.write_json(run.job_file, self._local_view(run, latest),
                         durable=latest.get(p.F_STATE) in p.FINAL_STATES)

    def _append_log(self, run: RemoteRun, text: str) -> None:
        path = p.sibling(run.job_file, p.LOG_FILE)
        # Its first write replaces the file: an adopted job's log is rebuilt from Ray's.
        fd = p.open_log(path)
        if not run.logged:
            os.ftruncate(fd, 0)
        with open(fd, "ab") as f:
            f.write(text.encode())
        run.logged = True
        if self.log_max_bytes is not None:
            p.cap_log(path, self.log_max_bytes)

    def _local_view(self, run: RemoteRun, data: dict[str, Any]) -> dict[str, Any]:
        data[p.F_LAUNCHER] = self.name
        if (data.get(p.F_STATE) == p.JobState.CANCELLED
                and p.stop_reason(run.job_file) == p.JobState.TIMEOUT):
            # The runner only knew it was signalled; the reason is on this side.
            data[p.F_STATE] = p.JobState.TIMEOUT
            data[p.F_ERROR] = p.stop_error(p.JobState.TIMEOUT, data.get(p.F_TIMEOUT_S))
        return data

    def _refused(self, run: RemoteRun, why: str) -> None:
        """A job Ray will not take: failed for good (not `lost`, tried again to be refused
        again), its error `why`."""
        try:
            data = p.read_json(run.job_file)
            if data is not None and data.get(p.F_STATE) not in p.FINAL_STATES:
                p.write_json(run.job_file, {
                    **data, p.F_STATE: p.JobState.FAILED, p.F_LAUNCHER: self.name,
                    p.F_ERROR: {"type": p.ErrorType.RUNNER, "message": why},
                    p.F_FINISHED_AT: p.now_iso()})
        except (OSError, p.CorruptJobFile) as exc:  # then ended as any: `lost`, with `why`
            log.warning("job %s: cannot write that Ray refused it: %s", run.job_id, exc)
        self._end(run, None, why)

    def _end(self, run: RemoteRun, code: int | None, how: str) -> None:
        run.code, run.how = code, how
        run.ended.set()

    # -- submitting -----------------------------------------------------------------

    def _record(self, sid: str, key: str) -> dict[str, Any]:
        return {"launcher": self.name, "submission_id": sid, "address": self.address,
                "claimed_by": os.getpid(), "launched_ns": time.time_ns(),
                "snapshot_key": key}

    def _say_submitted(self, run: RemoteRun) -> None:
        """Mark the claim: Ray has the job (an adopting supervisor sends one unmarked)."""
        run_file = p.sibling(run.job_file, p.RUN_FILE)
        try:
            record = p.read_json(run_file) or {}
            if record.get("submission_id") == run.submission_id:
                p.write_json(run_file, {**record, SUBMITTED: True}, durable=False)
        except (OSError, p.CorruptJobFile) as exc:  # then sent again: looked up first
            log.warning("job %s: cannot mark its claim as sent to Ray: %s", run.job_id, exc)

    def _metadata(self, data: dict[str, Any]) -> dict[str, str]:
        metadata = {"offload_job_id": str(data.get(p.F_ID)), "kind": str(data.get(p.F_KIND))}
        if self.folder_mark is not None:
            metadata[FOLDER_MARK] = self.folder_mark
        return metadata

    def _lookup(self, sid: str) -> RayJob | None:
        try:
            return self.client.info(sid)
        except RayJobNotFound:
            return None

    def _submit(self, sid: str, key: str, module: str, data: dict[str, Any]) -> None:
        entrypoint = " ".join([shlex.quote(self.python), "-m", module, REMOTE_FLAG])
        gpus = self.train_gpus if data.get(p.F_KIND) == "train" else 0.0
        env = {**self.env, remote.SNAPSHOT_KEY_ENV: key, **job_env(data)}
        size = sum(len(name) + len(value) + 6 for name, value in env.items())  # JSON's
        if size > RAY_ENV_MAX_CHARS:  # else it waits in Ray for good, holding a CPU
            raise RayRefused(
                f"the job takes {size // 1000} KB once encoded for Ray, which hands it to "
                f"its worker on one command line, capped at 128 KiB by Linux (at most "
                f"{RAY_ENV_MAX_CHARS // 1000} KB here): send less (a shorter conversation), "
                "or run it with the local launcher")
        try:
            self.client.submit(sid, entrypoint, env_vars=env, num_cpus=self.num_cpus,
                               num_gpus=gpus, metadata=self._metadata(data))
        except RayError as exc:
            try:
                found = self._lookup(sid)  # the answer may be lost, not the job
            except RayError:
                found = None
            if found is None:
                raise exc from None

def _attempt_here(jobs_dir: Path, sid: str) -> tuple[Path, int] | None:
    """The job file and attempt of a submission of Offload's (`submission_id`) whose job
    is of this folder's; None for any other."""
    if not sid.startswith(SUBMISSION_PREFIX):
        return None
    job_id, _, attempt = sid.removeprefix(SUBMISSION_PREFIX).partition("-")
    if attempt and not (attempt.isdigit() and attempt.isascii()):
        return None
    try:
        job_file = Path(p.job_path(jobs_dir, job_id))
    except ValueError:  # no job id
        return None
    return (job_file, int(attempt or 1)) if job_file.parent.is_dir() else None


def _remote(run: Run) -> RemoteRun:
    assert isinstance(run, RemoteRun), run
    return run


def _describe(info: RayJob) -> str:
    code = "" if info.exit_code is None else f", exit code {info.exit_code}"
    message = f": {info.message.splitlines()[0][:300]}" if info.message else ""
    return f"Ray job {info.status}{code}{message}"
