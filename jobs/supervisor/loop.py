"""The supervisor: launches queued jobs under the caps (in all, and per kind) by
priority, when due, enforces deadlines, acts on cancel requests, reaps finished or lost
runners (queueing a job again for a retry) and prunes old jobs.

Exactly one leads a data folder, across processes (`leadership`): when the leader
dies, a survivor takes over and adopts the runners it left.

`tick()` is synchronous and does one pass; `run()` drives it from asyncio in a worker
thread, so the event loop never waits on a spawn, a file write or a kill. A pass woken
by an event (a ring naming a job, a runner's exit) looks only at what the event names,
reaps and launches; a full pass (listing, the running jobs' stop requests, deadlines,
log caps) comes every SUPERVISOR_INTERVAL_S, and whenever a ring names no job; the stop
requests of the queued jobs are looked for every STOP_SWEEP_S (a cancel rings with its
job's id) and when a ring names no job; pruning every PRUNE_INTERVAL_S.

What is about one job (its run, deadline, stop, final state, release) is its `JobLife`
(`jobs.supervisor.lifecycle`); the supervisor keeps one per launched job and drives its steps.
Its other parts, mixed into `Supervisor`: how it comes to know the jobs (`discovery`), the
launching (`launching`), what follows a job's end (`endings`). Beside it: the log caps and
pruning (`housekeeping`), the queue and its caps (`launch_queue`), who leads
(`leadership`), what wakes a pass (`wakeups`), the counters for /metrics (`counting`) and
the jobs' dependencies (`dependencies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.kinds import runner_modules
from jobs.launch.base import Launcher
from jobs.launch.local import LocalLauncher
from jobs.launch.pick import make_launcher
from jobs.protocol.wake import ALL_JOBS
from jobs.settings import (
    DEFAULT_KIND_CAPS,
    LEADER_RETRY_S,
    MAX_CONCURRENT,
    MIN_RETENTION_S,
    RETENTION_HOURS,
    RETRY_BASE_S,
    RETRY_MAX_S,
    STOP_GRACE_S,
    STOP_SWEEP_S,
    SUPERVISOR_INTERVAL_S,
    Settings,
    kind_numbers,
)
from jobs.store.errors import StoreUnavailable
from jobs.store.folder_listing import DirListing
from jobs.store.job_store import JobStore
from jobs.store.reading import Signature
from jobs.supervisor.counting import Counting
from jobs.supervisor.dependencies import Dependencies
from jobs.supervisor.discovery import Discovery
from jobs.supervisor.endings import Endings
from jobs.supervisor.housekeeping import Pruning, cap_logs
from jobs.supervisor.launch_queue import LaunchQueue
from jobs.supervisor.launching import Launching
from jobs.supervisor.leadership import Leadership
from jobs.supervisor.lifecycle import JobLife
from jobs.supervisor.schedules import Scheduler
from jobs.supervisor.wakeups import Wakeups

log = logging.getLogger(__name__)


class Supervisor(Discovery, Launching, Endings):
    """Leads a data folder's jobs; its parts (discovery.py, launching.py, endings.py)
    use the state set here."""

    def __init__(
        self,
        jobs_dir: Path,
        max_concurrent: int = MAX_CONCURRENT,
        retention_s: float = RETENTION_HOURS * 3600,
        max_jobs: int | None = None,
        log_max_bytes: int | None = None,
        grace_s: float = STOP_GRACE_S,
        runner_env: dict[str, str] | None = None,
        kinds: dict[str, str] | None = None,
        launcher: Launcher | None = None,
        min_retention_s: float = MIN_RETENTION_S,
        kind_caps: dict[str, int] | None = None,
        retry_base_s: float = RETRY_BASE_S,
        retry_max_s: float = RETRY_MAX_S,
        scheduler: Scheduler | None = None,
        model_slots: int | None = None,
        final_write_patience_s: float = p.FINAL_WRITE_PATIENCE_S,
    ) -> None:
        self.dir = jobs_dir
        self._dir_name = os.fspath(jobs_dir)
        self.scheduler = scheduler  # creates the jobs of periodic schedules
        self.store = JobStore(jobs_dir)
        self._queue = LaunchQueue(jobs_dir.parent, max_concurrent,
                                 kind_numbers(DEFAULT_KIND_CAPS, "kind_caps", 1, 1024)
                                 if kind_caps is None else dict(kind_caps), model_slots)
        self._cap_now = max_concurrent  # the queue's runner_cap(), as at this pass's start
        self.log_max_bytes = log_max_bytes
        self._listing = DirListing(jobs_dir)
        self._names: set[str] = set()  # the job ids on disk, as last listed
        self.grace_s = grace_s
        self.final_write_patience_s = final_write_patience_s  # as runners wait for room
        # Runners cap their own logs when this says so (Settings.runner_env); the
        # supervisor's check each pass is for output that bypasses them.
        self.runner_env = dict(runner_env or {})
        self.kinds = kinds or runner_modules()
        # New jobs go to `launcher`; adopted ones to the launcher their run.json names.
        self.launcher = launcher or LocalLauncher(self.runner_env)
        self._launchers: dict[str, Launcher] = {self.launcher.name: self.launcher}
        self._leadership = Leadership(jobs_dir)
        self._wakeups = Wakeups(jobs_dir)
        self.is_leader = False
        self.lock_lost = False  # its lock file was removed or replaced: it leaves
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._said_unusable: str | None = None  # the data folder's problem, said once
        self._read_now: dict[str, dict[str, Any]] = {}  # queued jobs read in this pass
        self._next_full = 0.0
        self._next_sweep = 0.0  # of the queued jobs' stop requests
        self._running: dict[str, JobLife] = {}
        # The queued jobs that wait for a job to end (the first of their `depends_on` not
        # ended; a chat's earlier turn, its `after`, or its session's running chat: one
        # answer at a time per session), by that job's id; they stay in the queue, off
        # its launch order, so they hold up no other job.
        self._waiting: dict[str, list[str]] = {}
        self._running_chat_by_session: dict[str, str] = {}  # session id -> its running chat
        self._unwritten: dict[str, JobLife] = {}  # ended; final state (or retry) not written
        self._known_final: set[str] = set()
        self._dependencies = Dependencies(self._file, self._is_live,
                                          lambda job_id: job_id in self._known_final,
                                          self._queue.key_of)
        self._unreadable: set[str] = set()  # said once in the log; looked at each full pass
        self._damaged: dict[str, Signature] = {}  # known final as no job, until rewritten
        self._next_damaged_look = 0.0
        self._blocked = False  # the last launch could not write to the data folder
        self._pruning = Pruning(self.store, retention_s, max_jobs, min_retention_s,
                                lambda: self._dependencies.keep_for(self._queue.ids()))
        self._counting = Counting(jobs_dir.parent, self._file)
        self._stoppers: list[threading.Thread] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> Supervisor:
        scheduler = Scheduler.from_settings(settings, JobStore(settings.jobs_dir))
        return cls(
            settings.jobs_dir, max_concurrent=settings.max_concurrent,
            retention_s=settings.retention_hours * 3600, max_jobs=settings.max_jobs,
            log_max_bytes=settings.log_max_bytes, grace_s=settings.stop_grace_s,
            runner_env=settings.runner_env(), launcher=make_launcher(settings),
            min_retention_s=settings.min_retention_s, kind_caps=settings.kind_cap_map,
            retry_base_s=settings.retry_base_s, retry_max_s=settings.retry_max_s,
            scheduler=scheduler, model_slots=settings.model_slots,
            final_write_patience_s=settings.final_write_patience_s,
        )

    # -- driving -------------------------------------------------------------------

    async def run(self, lead_within_s: float | None = None) -> None:
        """Run until cancelled (runners keep running when this stops). With
        `lead_within_s`, return if another supervisor still leads after that long."""
        self._wakeups.bind(asyncio.get_running_loop())
        # A thread of the passes' own: one pass at a time, and one put off (no thread
        # could be started) never runs later on a thread of the loop's, beside the next.
        self._passes = ThreadPoolExecutor(1, thread_name_prefix="supervisor-pass")
        give_up_at = None if lead_within_s is None else time.monotonic() + lead_within_s
        try:
            while True:
                if give_up_at is not None and not self.is_leader and time.monotonic() > give_up_at:
                    if self._leadership.problem is not None:
                        log.warning("cannot lead %s (%s); leaving", self.dir,
                                    self._leadership.problem)
                    else:
                        log.info("another supervisor leads %s; leaving", self.dir)
                    return
                self._wakeups.before_pass()
                await self._pass()
                if self.lock_lost:
                    return
                await self._wakeups.sleep(self._idle_s() if self.is_leader else LEADER_RETRY_S,
                                          leading=self.is_leader)
        finally:
            self._passes.shutdown(wait=False, cancel_futures=True)  # none after the release
            self.release()

    def _idle_s(self) -> float:
        """Until the next full pass, or until the first job waiting for its time is due."""
        idle = self._next_full - time.monotonic()
        due_at = self._queue.next_due_at()
        if due_at is not None:
            idle = min(idle, due_at - time.time())
        return max(0.0, idle)

    async def _pass(self) -> None:
        """One tick in a worker thread. Cancelled meanwhile, it still waits for the tick
        to end, so a stopped supervisor never launches after it released the lock."""
        try:
            tick = asyncio.get_running_loop().run_in_executor(self._passes, self.tick)
        except RuntimeError as exc:  # no thread can be started now (a limit on processes)
            log.warning("supervisor pass put off: %s", exc)
            return  # the next pass tries again: the supervisor lives on
        try:
            await asyncio.shield(tick)
            self._said_unusable = None
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await tick
            raise
        except StoreUnavailable as exc:  # once, not four times a second
            if str(exc) != self._said_unusable:
                log.warning("supervisor pass failed: %s; retrying", exc)
                self._said_unusable = str(exc)
        except Exception:
            log.exception("supervisor pass failed; retrying")

    def wake(self, job_id: str = ALL_JOBS) -> None:
        """Ask for a pass now: to look at `job_id` (submitted or cancelled), or, without
        one, at every job."""
        self._wakeups.want(job_id)
        self._wakeups.nudge()

    def launch_problem(self) -> str | None:
        """What keeps a launcher of this supervisor from running jobs now, in words."""
        return next((said for each in list(self._launchers.values())
                     if (said := each.problem())), None)

    def release(self) -> None:
        # With its lock lost, the socket and the counters at those paths are another
        # leader's now: left alone.
        self._wakeups.close(unlink=not self.lock_lost)
        for each in self._launchers.values():
            each.close()
        if self.is_leader:
            if not self.lock_lost:
                self._counting.save(self._running, force=True)
            self._leadership.release()
            self.is_leader = False
            log.info("supervisor released %s", self.dir)

    def wait_for_stoppers(self, timeout: float | None = None) -> None:
        for thread in list(self._stoppers):
            thread.join(timeout)

    # -- one pass ------------------------------------------------------------------

    def tick(self) -> None:
        if not self.is_leader and not self._take_lead():
            return
        if not self._leadership.still_here():
            # Another supervisor may lead by a new file at that path: two leaders would
            # each launch the same jobs. The API starts one again if none leads.
            log.warning("the supervisor lock %s was removed or replaced while this "
                        "supervisor led: it leaves, so that one leads (its runners run on, "
                        "adopted by the next leader)", self._leadership.lock_file)
            self.lock_lost = True
            return
        hinted, full, cancels = self._wakeups.take()
        now = time.monotonic()
        self._cap_now = self._queue.runner_cap()
        # A quick pass looks only at the jobs an event named (a submission, a runner's
        # exit); a full one, every SUPERVISOR_INTERVAL_S, lists the folder and also runs
        # the schedules, the deadlines, the log caps and pruning.
        sweep = full or now >= self._next_sweep
        full = full or now >= self._next_full
        try:
            if full:
                self._next_full = now + SUPERVISOR_INTERVAL_S
                if sweep:
                    self._next_sweep = now + STOP_SWEEP_S
                if self.scheduler is not None:
                    self.scheduler.fire(self.wake)
                job_ids, stop_ids = self._scan(sweep)
                self._discover(job_ids)
                self._write_held_finals(job_ids)
                self._handle_stops(stop_ids)
            else:
                self._look_at(hinted)
            self._handle_stops(cancels)  # rung, their stop requests not on disk (a full disk)
            self._reap()
            if full:
                self._enforce_deadlines()
                cap_logs(self._running.values(), self.log_max_bytes)
                self._recheck_waiting()
            self._queue.release_due()
            self._fail_unmet_dependents()
            self._launch()
            if full:
                self._pruning.maybe_prune(len(self._names))
        finally:
            self._read_now.clear()
            self._counting.save(self._running)

    def _take_lead(self) -> bool:
        if not self._leadership.take():
            return False
        self.is_leader = True
        self._counting.take_over()
        log.info("supervisor leads %s (pid %s)", self.dir, os.getpid())
        self.launcher.leading()
        return True

    def _enqueue(self, job_id: str, data: dict[str, Any]) -> None:
        self._queue.add(job_id, data)
        self._dependencies.note(job_id, data)

    def _now_running(self, job_id: str, life: JobLife, data: dict[str, Any]) -> None:
        kind = str(data.get(p.F_KIND))
        self._running[job_id] = life
        self._queue.runner_started(job_id, kind)
        if (session := p.chat_session(kind, data.get(p.F_INPUT))) is not None:
            self._running_chat_by_session[session] = job_id  # the next turn waits for it

    def _no_longer_running(self, job_id: str) -> None:
        del self._running[job_id]
        self._queue.runner_gone(job_id)

    def _handle_stops(self, stop_ids: set[str]) -> None:
        for job_id in stop_ids:
            if self._queue.discard(job_id):
                self._cancel_unstarted(job_id)
            elif job_id in self._running:
                life = self._running[job_id]
                if life.may_stop and not life.timeout_held:
                    self._start_stop(life, life.stop_reason())
            elif job_id in self._unwritten:  # ended: a retry waiting for room is not run
                held = self._unwritten[job_id]
                held.stopping = held.stopping or held.stop_reason()

    def _reap(self) -> None:
        for job_id, life in list(self._running.items()):
            if life.has_ended():
                self._no_longer_running(job_id)
                self._finalize(life)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for life in self._running.values():
            # A cancel's stop tried again keeps its request: not rewritten as a timeout.
            if life.is_overdue(now) and (life.stopping is not None or life.request_timeout(
                    now, self.final_write_patience_s)):
                self._start_stop(life, p.JobState.TIMEOUT)

    def _start_stop(self, life: JobLife, reason: str) -> None:
        self._stoppers = [t for t in self._stoppers if t.is_alive()]
        self._stoppers.append(life.begin_stop(reason, self.grace_s, self._wakeups.nudge))

    def _file(self, job_id: str) -> Path:
        return Path(p.job_path(self.dir, job_id))
