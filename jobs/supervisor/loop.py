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
Beside it: the queue and its caps (`launch_queue`), who leads (`leadership`), what wakes
a pass (`wakeups`), the counters for /metrics (`counting`) and the jobs' dependencies
(`dependencies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs import protocol as p
from jobs.kinds import runner_modules
from jobs.launch.base import CannotStartNow, ClaimFailed, Launcher
from jobs.launch.local import LocalLauncher
from jobs.launch.pick import adopting_launcher, make_launcher
from jobs.launch.processes import IS_WINDOWS
from jobs.protocol.control import queue_paused
from jobs.protocol.wake import ALL_JOBS
from jobs.settings import (
    CLAIM_RETRY_S,
    DEFAULT_KIND_CAPS,
    LEADER_RETRY_S,
    MAX_CONCURRENT,
    MIN_RETENTION_S,
    PRUNE_INTERVAL_S,
    PRUNE_OVER_CAP_S,
    RETENTION_HOURS,
    RETRY_BASE_S,
    RETRY_MAX_S,
    STOP_GRACE_S,
    STOP_SWEEP_S,
    SUPERVISOR_INTERVAL_S,
    Settings,
    kind_numbers,
)
from jobs.store.folder_listing import DirListing
from jobs.store.job_store import JobStore
from jobs.store.reading import not_a_job, read_job
from jobs.supervisor.counting import Counting
from jobs.supervisor.dependencies import Dependencies
from jobs.supervisor.launch_queue import LaunchQueue
from jobs.supervisor.leadership import Leadership
from jobs.supervisor.lifecycle import JobLife
from jobs.supervisor.schedules import Scheduler
from jobs.supervisor.wakeups import Wakeups

log = logging.getLogger(__name__)


class Supervisor:
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
    ) -> None:
        self.dir = jobs_dir
        self._dir_name = os.fspath(jobs_dir)
        self.scheduler = scheduler  # creates the jobs of periodic schedules
        self.min_retention_s = min_retention_s
        self.store = JobStore(jobs_dir)
        self._queue = LaunchQueue(jobs_dir.parent, max_concurrent,
                                 kind_numbers(DEFAULT_KIND_CAPS, "kind_caps", 1, 1024)
                                 if kind_caps is None else dict(kind_caps))
        self._cap_now = max_concurrent  # the queue's runner_cap(), as at this pass's start
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self.log_max_bytes = log_max_bytes
        self._listing = DirListing(jobs_dir)
        self._names: set[str] = set()  # the job ids on disk, as last listed
        self.grace_s = grace_s
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
        self._unwritten: dict[str, JobLife] = {}  # ended; final state not written yet
        self._known_final: set[str] = set()
        self._dependencies = Dependencies(self._file, self._is_live,
                                          lambda job_id: job_id in self._known_final,
                                          self._queue.key_of)
        self._unreadable: set[str] = set()  # said once in the log; looked at each full pass
        self._blocked = False  # the last launch could not write to the data folder
        self._next_prune = 0.0
        self._pruned_at = 0.0
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
            scheduler=scheduler,
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
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await tick
            raise
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
        hinted, full = self._wakeups.take()
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
                self._retry_finals(job_ids)
                self._handle_stops(stop_ids)
            else:
                self._look_at(hinted)
            self._reap()
            if full:
                self._enforce_deadlines()
                self._cap_logs()
                self._recheck_waiting()
            self._queue.release_due()
            self._fail_unmet_dependents()
            self._launch()
            if full:
                self._maybe_prune()
        finally:
            self._read_now.clear()
            self._counting.save(self._running)

    def _look_at(self, job_ids: set[str]) -> None:
        """The jobs an event named: a new one joins the queue, a live one may be stopping."""
        for job_id in job_ids:
            if job_id in self._queue or job_id in self._running:
                if os.path.exists(self._stop_file(job_id)):
                    self._handle_stops({job_id})
            elif (job_id not in self._known_final and job_id not in self._unwritten
                  and os.path.exists(self._file(job_id))):
                self._names.add(job_id)
                self._discover_one(job_id)

    def _take_lead(self) -> bool:
        if not self._leadership.take():
            return False
        self.is_leader = True
        self._counting.take_over()
        log.info("supervisor leads %s (pid %s)", self.dir, os.getpid())
        return True

    def _scan(self, sweep: bool) -> tuple[set[str], set[str]]:
        """The jobs on disk, and which of the running ones (`sweep`: of the live ones)
        have a stop request. A look at each is a stat: thousands queued took a fifth of
        a CPU, every SUPERVISOR_INTERVAL_S."""
        names = self._listing.changed(self._names)
        if names is not None:
            self._names = names
        jobs = self._names
        live = (self._queue.ids() | self._running.keys() if sweep else self._running.keys()) & jobs
        stops = {job_id for job_id in live if os.path.exists(self._stop_file(job_id))}
        return jobs, stops

    def _discover(self, job_ids: set[str]) -> None:
        for gone in self._queue.ids() - job_ids:
            self._queue.discard(gone)  # deleted from disk while queued
            self._dependencies.ended(gone)  # the jobs that depend on it fail
        for gone in set(self._running) - job_ids:
            life = self._running[gone]
            # Its folder deleted by hand: the job is no more, and its runner held a slot
            # until its deadline. (The listing may be a moment old: the folder tells.)
            if not life.stopping and not os.path.exists(os.path.dirname(life.job_file)):
                log.info("job %s was deleted while it ran; its runner is stopped", gone)
                self._start_stop(life, p.JobState.CANCELLED)
        self._known_final &= job_ids
        new = (job_ids - self._known_final - self._queue.ids() - self._running.keys()
               - self._unwritten.keys())
        for job_id in new:
            self._discover_one(job_id)

    def _discover_one(self, job_id: str) -> None:
        try:
            self._take_on(job_id)
        except Exception:  # one odd entry must not stop the pass for every other job
            if job_id not in self._unreadable:
                log.exception("job %s cannot be looked at; it is left alone", job_id)
                self._unreadable.add(job_id)

    def _take_on(self, job_id: str) -> None:
        try:
            data = p.read_json(self._file(job_id))
        except (p.CorruptJobFile, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in p.NO_FILE_TO_READ:
                raise
            self._known_final_now(job_id)  # reads as failed/corrupt; nothing to run
            return
        if data is None:
            return
        state = data.get(p.F_STATE)
        if state == p.JobState.QUEUED and not self._launched(job_id):
            if self._hand_edited(job_id, data) or self._unknown_kind(job_id, data):
                return
            self._enqueue(job_id, data)
            if len(self._read_now) < self._cap_now:  # no more can launch in a pass
                self._read_now[job_id] = data
        elif state in (p.JobState.QUEUED, p.JobState.RUNNING):
            self._adopt(job_id, data)
        else:  # final, or no state at all (the API reads it as corrupt): never rewritten
            self._known_final_now(job_id, state)
            if state in p.FINAL_STATES:
                self._counting.found_final(job_id, data)

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

    def _adopt(self, job_id: str, data: dict[str, Any]) -> None:
        """A job launched by an earlier supervisor: watch it if alive, else it is lost."""
        life = JobLife.adopt(job_id, self._file(job_id), data, self._launcher_for,
                             self._wakeups.nudge)
        if life.has_ended():
            log.info("job %s: runner gone while no supervisor watched it", job_id)
            self._finalize(life)
            return
        log.info("job %s: adopted its %s runner", job_id, life.run.launcher)
        self._now_running(job_id, life, data)

    def _launcher_for(self, record: dict[str, Any]) -> Launcher:
        name = str(record.get("launcher") or p.LOCAL)
        found = self._launchers.get(name)
        if found is None:
            found = self._launchers[name] = adopting_launcher(record, self.runner_env,
                                                              self.log_max_bytes)
        return found

    def _handle_stops(self, stop_ids: set[str]) -> None:
        for job_id in stop_ids:
            if self._queue.discard(job_id):
                self._end_unstarted(job_id, p.JobState.CANCELLED, p.ErrorType.CANCELLED,
                                    "cancelled before it started")
            elif job_id in self._running:
                life = self._running[job_id]
                if life.stopping is None:
                    self._start_stop(life, life.stop_reason())

    def _reap(self) -> None:
        for job_id, life in list(self._running.items()):
            if life.has_ended():
                self._no_longer_running(job_id)
                self._finalize(life)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for life in self._running.values():
            if life.is_overdue(now):
                life.request_timeout()
                self._start_stop(life, p.JobState.TIMEOUT)

    def _launch(self) -> None:
        if queue_paused(self.dir.parent):
            return  # queued jobs wait; POST /api/queue/resume wakes this loop
        self._queue.release_set_aside()
        # The pause and the cap looked at before each launch: a burst of hundreds takes
        # seconds, and a pause or a lower cap meanwhile holds from the next launch on.
        while len(self._running) < self._queue.runner_cap():
            job_id = self._queue.pop_next()
            if job_id is None or not self._launch_one(job_id):
                break
            if queue_paused(self.dir.parent):
                break

    def _launch_one(self, job_id: str) -> bool:
        """Start one queued job if it may start now; False if the data folder cannot be
        written now (the job stays queued and launching waits for the next pass)."""
        data = self._prepare_start(job_id)
        return True if data is None else self._start(job_id, data)

    def _prepare_start(self, job_id: str) -> dict[str, Any] | None:
        """The queued job as its file says, if it may start now; else None, once what
        keeps it is dealt with: ended or edited since (nothing to do), cancelled (ended
        here), waiting for another job (set aside under it), or failed by a dependency."""
        job_file = self._file(job_id)
        # Read once per pass: a cancel since then left its stop file, looked for below.
        data = self._read_now.pop(job_id, None)
        fresh = data is None  # not read in this pass: perhaps edited by hand as it waited
        if fresh:
            data = p.read_json_or_none(job_file)
        if data is None or data.get(p.F_STATE) != p.JobState.QUEUED:
            return None
        if fresh and (self._hand_edited(job_id, data) or self._unknown_kind(job_id, data)):
            return None
        if os.path.exists(p.sibling(job_file, p.STOP_FILE)):
            self._end_unstarted(job_id, p.JobState.CANCELLED, p.ErrorType.CANCELLED,
                                "cancelled before it started")
            return None
        blocker = self._blocker(job_id, data)
        if blocker is not None:
            self._queue.hold(job_id, data)
            self._waiting.setdefault(blocker, []).append(job_id)
            return None
        unmet = self._dependencies.unmet(job_id, data)
        if unmet is not None:
            self._end_unstarted(job_id, p.JobState.FAILED, p.ErrorType.DEPENDENCY, unmet)
            return None
        return data

    def _start(self, job_id: str, data: dict[str, Any]) -> bool:
        """Claim the job and start its runner; False if the data folder cannot be
        written now (the job is queued again)."""
        life = JobLife(job_id, self._file(job_id), self.launcher)
        try:
            started = life.start(self.kinds[data[p.F_KIND]], data, self._wakeups.nudge)
        except ClaimFailed as exc:
            if self._own_folder_refuses(job_id, exc):
                self._retry_later(job_id, data, CLAIM_RETRY_S)
                return True  # the others go on
            if not self._blocked:
                log.warning("jobs wait: %s", exc if isinstance(exc, CannotStartNow)
                            else f"cannot write to the data folder ({exc})")
            self._blocked = True
            self._enqueue(job_id, data)
            return False
        self._blocked = False  # a next hold-up is said again
        if started:
            self._counting.started(data)
            self._now_running(job_id, life, data)
        else:
            self._settle(life)
        return True

    def _own_folder_refuses(self, job_id: str, exc: ClaimFailed) -> bool:
        """Whether a claim was refused by the job's own folder (its permissions, made
        immutable) while the jobs folder takes writes: that job alone waits."""
        if isinstance(exc, CannotStartNow) or exc.errno not in (errno.EPERM, errno.EACCES):
            return False
        if not os.access(self.dir, os.W_OK):
            return False
        log.warning("job %s waits %g s: its folder refuses its launch claim (%s); the "
                    "other jobs go on", job_id, CLAIM_RETRY_S, exc)
        return True

    def _retry_later(self, job_id: str, data: dict[str, Any], delay_s: float) -> None:
        self._queue.add_later(job_id, data, time.time() + delay_s)

    def _hand_edited(self, job_id: str, data: dict[str, Any]) -> bool:
        """Whether a queued job's file is no job the API can show (edited by hand, say a
        `timeout_s` of "abc"): the API reads it as failed, corrupt, so it never runs."""
        if not_a_job(job_id, data) is None:
            return False
        self._queue.discard(job_id)
        self._known_final_now(job_id)  # the jobs that depend on it fail
        return True

    def _unknown_kind(self, job_id: str, data: dict[str, Any]) -> bool:
        """Whether a queued job's kind is none this supervisor runs (edited by hand, or a
        kind since removed from OFFLOAD_KINDS): it fails, unstarted."""
        kind = data.get(p.F_KIND)
        if isinstance(kind, str) and kind in self.kinds:
            return False
        self._queue.discard(job_id)
        self._end_unstarted(job_id, p.JobState.FAILED, p.ErrorType.RUNNER,
                            f"unknown job kind {kind!r}")
        return True

    def _blocker(self, job_id: str, data: dict[str, Any]) -> str | None:
        """The live job a job must wait for: the first its `depends_on` names that has not
        ended (and had its final state written); a chat's earlier turn its `after` names
        (queued ahead of it, or running), else its session's running chat; None: it may
        start."""
        dependency = self._dependencies.blocker(job_id, data)
        if dependency is not None:
            return dependency
        after = data.get(p.F_AFTER)
        if isinstance(after, str) and after != job_id:
            ahead = self._queue.key_of(after)
            if after in self._running or (ahead is not None
                                          and ahead[1:] < p.queue_key(data)[1:]):
                return after
            if after not in self._unwritten and self._unseen_live(after):
                return after
        session = p.chat_session(data.get(p.F_KIND), data.get(p.F_INPUT))
        return self._running_chat_by_session.get(session) if session is not None else None

    def _known_final_now(self, job_id: str, state: object = None) -> None:
        """A job found final (at a start, in any order; `state` None: no job, damaged):
        jobs queued after it are looked at."""
        self._known_final.add(job_id)
        self._dependencies.ended(job_id, state)

    def _fail_unmet_dependents(self) -> None:
        """The queued jobs with a dependency that ended without completing fail now, not
        when a slot frees (or the queue is resumed); a chain of them, one after another."""
        for job_id in self._dependencies.to_look_at():
            if job_id not in self._queue:
                continue
            data = p.read_json_or_none(self._file(job_id))
            if data is None or data.get(p.F_STATE) != p.JobState.QUEUED:
                continue
            unmet = self._dependencies.unmet(job_id, data)
            if unmet is not None:  # else it starts in its turn, once they all completed
                self._queue.discard(job_id)
                self._end_unstarted(job_id, p.JobState.FAILED, p.ErrorType.DEPENDENCY, unmet)

    def _is_live(self, job_id: str) -> bool:
        """Whether a job has not ended: queued, running, its final state not yet written,
        or queued or running on disk though this supervisor has not seen it yet."""
        return (job_id in self._running or job_id in self._queue
                or job_id in self._unwritten or self._unseen_live(job_id))

    def _unseen_live(self, job_id: str) -> bool:
        """Whether a job this supervisor has not seen queued, running or ending is queued
        or running on disk (the next full pass takes it on)."""
        if (job_id in self._known_final or job_id in self._queue or job_id in self._running
                or not p.is_valid_id(job_id)):
            return False
        state = (read_job(job_id, self._file(job_id)) or {}).get(p.F_STATE)
        return state in (p.JobState.QUEUED, p.JobState.RUNNING)

    def _let_waiters_go(self, ended: str, state: object = None) -> None:
        """A job has ended (in `state`, if known): the jobs that waited for it go back on
        the queue."""
        self._dependencies.ended(ended, state)
        for conversation, job_id in list(self._running_chat_by_session.items()):
            if job_id == ended:
                del self._running_chat_by_session[conversation]
        for job_id in self._waiting.pop(ended, ()):
            self._queue.back_in_order(job_id)

    def _recheck_waiting(self) -> None:
        """Waits on a job that is no longer live in any way this supervisor saw end (it
        was deleted, or read before it was discovered): back on the queue."""
        for blocker in list(self._waiting):
            if blocker not in self._running and blocker not in self._queue:
                self._let_waiters_go(blocker)

    def _start_stop(self, life: JobLife, reason: str) -> None:
        self._stoppers = [t for t in self._stoppers if t.is_alive()]
        self._stoppers.append(life.begin_stop(reason, self.grace_s, self._wakeups.nudge))

    def _finalize(self, life: JobLife) -> None:
        try:
            life.finalize(self._backoff)
        finally:
            self._settle(life)
        if life.requeued is not None:  # a transient failure with attempts left
            earlier = life.requeued.get(p.F_EARLIER_ERRORS) or [{}]
            self._counting.retried(life.requeued, str(earlier[-1].get("type")))
            self._enqueue(life.job_id, life.requeued)

    def _backoff(self, attempt: int) -> float:
        """Seconds before attempt `attempt` + 1: exponential, with full jitter."""
        return random.uniform(0, min(self.retry_max_s, self.retry_base_s * 2 ** (attempt - 1)))

    def _end_unstarted(self, job_id: str, state: str, error_type: str, message: str) -> None:
        """A job that ends before its runner started: only its final state to write."""
        life = JobLife(job_id, self._file(job_id), self.launcher)
        life.finish(state, error_type, message)
        self._settle(life)

    def _settle(self, life: JobLife) -> None:
        """After a final write: known final, kept to write again, or (gone) forgotten;
        the jobs that waited for it may start."""
        self._let_waiters_go(life.job_id, (life.final_job or {}).get(p.F_STATE)
                        if life.is_final and life.unwritten is None else None)
        if life.unwritten is not None:
            self._unwritten[life.job_id] = life
        elif life.is_final:
            self._known_final.add(life.job_id)
            if life.final_job is not None:
                self._counting.ended(life.final_job)
                life.final_job = None  # counted once, however often it settles

    def _retry_finals(self, job_ids: set[str]) -> None:
        """Write the final states that could not be written again (`job_ids`: on disk)."""
        for job_id, life in list(self._unwritten.items()):
            if job_id not in job_ids:
                del self._unwritten[job_id]  # deleted meanwhile
                life.release()
                continue
            life.retry()
            if life.unwritten is None:
                del self._unwritten[job_id]
                self._settle(life)

    # -- housekeeping --------------------------------------------------------------

    def _cap_logs(self) -> None:
        """A runner printing without end: its log keeps its head and its latest output."""
        if self.log_max_bytes is None or IS_WINDOWS:
            # Windows: a runner's inherited log handle is not an append handle, so a
            # cut would leave it writing past the new end; logs are not capped there.
            return
        for life in self._running.values():
            if life.run.launcher != p.LOCAL:
                continue  # a remote job's local copy is written and capped by its poller
            dropped = p.cap_log(p.sibling(life.job_file, p.LOG_FILE), self.log_max_bytes)
            if dropped:
                log.info("job %s: log capped (%d bytes dropped)", life.job_id, dropped)

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        over_cap = self.max_jobs is not None and len(self._names) > self.max_jobs
        if now < self._next_prune and not (over_cap and now > self._pruned_at + PRUNE_OVER_CAP_S):
            return
        self._next_prune = now + PRUNE_INTERVAL_S
        self._pruned_at = now
        removed = self.store.prune(self.retention_s, self.max_jobs,
                                   min_retention_s=self.min_retention_s,
                                   keep=self._dependencies.keep_for(self._queue.ids()))
        if removed:
            log.info("pruned %d finished jobs (older than %.0f h, or beyond %s jobs; none "
                     "younger than %.0f s)", removed, self.retention_s / 3600, self.max_jobs,
                     self.min_retention_s)

    def _launched(self, job_id: str) -> bool:
        return os.path.exists(p.sibling(self._file(job_id), p.RUN_FILE))

    def _file(self, job_id: str) -> Path:
        return Path(p.job_path(self.dir, job_id))

    def _stop_file(self, job_id: str) -> str:
        return os.path.join(self._dir_name, job_id, p.STOP_FILE)  # no Path: one a job a pass

