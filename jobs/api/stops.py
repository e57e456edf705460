"""Jobs the API is asked to stop or remove: a stop is asked in the job's folder and
waited for without blocking (where it cannot be written, a full disk, the leading
supervisor is asked through its socket); only a finished job that no live job needs is
removed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.protocol.wake import poke, ring_cancel
from jobs.settings import CANCEL_WAIT_JOB_S, CANCEL_WAIT_S, Settings
from jobs.store.dependency_lock import dependencies_held
from jobs.store.job_store import JobNotFound, JobStore, StoreUnavailable

# A cancel left as an empty request (no room for its words), not final in time.
NO_ROOM_TO_END = "no room on the data folder's disk for the job's final state"
# Free space below a job file's size and this is taken as no room for its final state.
ROOM_MARGIN_BYTES = 64 << 10
# Said of both: a runner that had ended keeps its own end, which the supervisor holds in
# memory alone until there is room (the API cannot tell; a restart meanwhile forgets it).
OR_AS_IT_ENDED = ("or as it ended, if its runner had already ended (its final state "
                  "waiting for room too)")
RECORDED = ("The cancel is recorded: the supervisor stops the job (a queued one does not "
            f"start) and it shows as cancelled once there is room, {OR_AS_IT_ENDED}")
# A cancel the leader took from its socket, not even an empty request on disk.
UNRECORDED = ("The supervisor stops the job all the same (a queued one does not start, a "
              "running one's runner is stopped) and records it cancelled once there is "
              f"room, {OR_AS_IT_ENDED}; a restart of the supervisor before then forgets "
              "this cancel, so cancel it again once there is room")


class AlreadyFinished(Exception):
    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job[p.F_ID]} has already finished ({job[p.F_STATE]})")
        self.job = job


class StillNeeded(Exception):
    """A job asked to be removed that has not finished, or that a live job needs."""


class NotRemoved(Exception):
    """A job's folder that could not be deleted in full."""


class Stops:
    """Cancels (a stop asked, then waited for) and removals of jobs, for the routes."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for the stop and wait (without blocking) until the job is final; on a full
        disk, raise at once the error that says its final state waits for room."""
        job = await run_in_threadpool(self.store.read, job_id)
        if job.get(p.F_STATE) in p.FINAL_STATES:
            raise AlreadyFinished(job)
        stopped = await self._stopped_or_no_room([job_id])
        if job_id not in stopped:  # deleted meanwhile
            raise JobNotFound(job_id)
        return stopped[job_id]

    async def cancel_many(self, job_ids: list[str]
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """Cancel several jobs together: the jobs asked to stop, as they are after the
        wait; those that had finished; the ids of no job. On a full disk, raise as `cancel`
        does where one of them is not final."""
        def read_each() -> tuple[list[dict[str, Any]], list[str]]:
            found, missing = [], []
            for job_id in job_ids:
                try:
                    found.append(self.store.read(job_id))
                except JobNotFound:
                    missing.append(job_id)
            return found, missing

        found, missing = await run_in_threadpool(read_each)
        finished = [job for job in found if job.get(p.F_STATE) in p.FINAL_STATES]
        # Newest first: a job that depends on another is newer (only a hand-edited file
        # has it otherwise), so its stop stands before the one it depends on is acted on.
        live = sorted((job for job in found if job.get(p.F_STATE) not in p.FINAL_STATES),
                      key=lambda job: str(job.get(p.F_CREATED_AT)), reverse=True)
        stopped = await self._stopped_or_no_room([str(job[p.F_ID]) for job in live])
        missing += [str(job[p.F_ID]) for job in live if job[p.F_ID] not in stopped]
        return [stopped[job_id] for job_id in job_ids if job_id in stopped], finished, missing

    async def _stopped_or_no_room(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """`stopped`, raising its full disk's error where a job is not final (stopped, but
        its final state waits for room: said so)."""
        stopped, no_room = await self.stopped(job_ids)
        if no_room is not None and any(job.get(p.F_STATE) not in p.FINAL_STATES
                                       for job in stopped.values()):
            raise no_room
        return stopped

    async def stopped(self, job_ids: list[str]
                      ) -> tuple[dict[str, dict[str, Any]], StoreUnavailable | None]:
        """Ask each job to stop, in this order, and wait (without blocking) until all are
        final or the stop's grace is over; each job as it is then (gone: left out). Every
        request stands before the supervisor is rung with any: one acted on before the
        request of a job depending on it stood would fail that job (dependency), not
        cancel it. On a full disk, also the error to say of those not final, which are
        then not waited for: their final state waits for room."""
        no_room, asked = None, []
        try:
            for job_id in job_ids:
                no_room = await self._leave_stop(job_id) or no_room
                asked.append(job_id)
        except StoreUnavailable as exc:
            if len(job_ids) > 1:  # of several: whose request was not left, and the others'
                exc.outcome = (f"Job {job_id} was not cancelled, nor "
                               f"{len(job_ids) - len(asked) - 1} more of them; the other "
                               f"{len(asked)} were (they stop as asked)")
            raise
        finally:  # those asked stand: acted on now, not at the supervisor's next sweep
            for each in asked:
                poke(self.store.dir, each)
        jobs = await self._wait_final(job_ids, patient=no_room is None)
        return jobs, no_room or await self._no_room_to_end(jobs)

    async def _no_room_to_end(self, jobs: dict[str, dict[str, Any]]
                              ) -> StoreUnavailable | None:
        """The error to say where a job asked to stop, in full, is not final past the
        stop's grace and its disk has no room to write that: the stop request fitted,
        its final state does not (else the answer said the job is still running, as if
        the supervisor were not)."""
        def no_room() -> bool:
            try:
                free = shutil.disk_usage(self.store.dir).free
                return any(free < self.store.path(job_id).stat().st_size + ROOM_MARGIN_BYTES
                           for job_id, job in jobs.items()
                           if job.get(p.F_STATE) not in p.FINAL_STATES)
            except OSError:
                return False  # removed meanwhile, or the disk not known: said as it is
        if all(job.get(p.F_STATE) in p.FINAL_STATES for job in jobs.values()):
            return None
        if not await run_in_threadpool(no_room):
            return None
        return StoreUnavailable(NO_ROOM_TO_END, RECORDED, retry=False, no_room=True)

    async def _leave_stop(self, job_id: str) -> StoreUnavailable | None:
        """Leave its stop request (the caller rings the supervisor); on a full disk, the
        error to say if the job is not final in time. Where not even an empty request finds
        room (no inode left), the leader is asked through its socket alone. Raised where no
        leader took the ring."""
        try:
            whole = await run_in_threadpool(self.store.request_cancel, job_id)
        except JobNotFound:
            return None  # deleted meanwhile: left out of the answer
        except StoreUnavailable as exc:
            # Not for an unwritable folder: a runaway job fills a disk, not that.
            if not exc.disk_full or not ring_cancel(self.store.dir, job_id):
                raise  # no leader listening (or no socket, as on Windows): not cancelled
            exc.outcome = UNRECORDED
            return exc
        if whole:
            return None
        return StoreUnavailable(NO_ROOM_TO_END, RECORDED, retry=False, no_room=True)

    async def _wait_final(self, job_ids: list[str], patient: bool = True
                          ) -> dict[str, dict[str, Any]]:
        """Each job once final, or as it is past the stop's grace (not `patient`: at once)."""
        patience = (self.settings.stop_grace_s + CANCEL_WAIT_S
                    + CANCEL_WAIT_JOB_S * (len(job_ids) - 1)) if patient else 0.0
        deadline = time.monotonic() + patience
        jobs: dict[str, dict[str, Any]] = {}
        while True:
            await asyncio.sleep(0.05)
            for job_id in job_ids:
                if jobs.get(job_id, {}).get(p.F_STATE) in p.FINAL_STATES:
                    continue  # final stays final: not read again
                with contextlib.suppress(JobNotFound):
                    jobs[job_id] = await run_in_threadpool(self.store.read, job_id)
            if time.monotonic() > deadline or all(
                    job.get(p.F_STATE) in p.FINAL_STATES for job in jobs.values()):
                # Listings show them so from now on (the index looks at a queued job far
                # back in line once a second).
                await run_in_threadpool(self.store.look_at, list(jobs))
                return jobs

    async def remove(self, job_id: str) -> dict[str, Any]:
        """Delete a finished job now, with all it left (job file, log, records, its
        Idempotency-Key), as pruning would later; the job as it was."""
        job = await run_in_threadpool(self.store.read, job_id)
        state = job.get(p.F_STATE)
        if state not in p.FINAL_STATES:
            raise StillNeeded(f"job {job_id} is {state}: only a finished job is removed; "
                              "cancel it first")
        problem = await run_in_threadpool(self._remove_unneeded, job_id, job)
        if problem is not None:  # a file held open (Windows), say: not a full disk
            raise NotRemoved(f"job {job_id} could not be removed in full ({problem}); what "
                             "is left goes with another try, or with pruning")
        return job

    def _remove_unneeded(self, job_id: str, job: dict[str, Any]) -> str | None:
        """Removed unless a job not ended needs it, looked at and removed under the lock
        that a submission with `depends_on` holds to check and store: no job is stored
        depending on this one between the look and the removal (it would fail
        `dependency`, told at its submission that the job was there)."""
        with dependencies_held(self.store.dir.parent, "the job was not removed"):
            if not self.store.path(job_id).exists():  # removed meanwhile, by another request
                raise JobNotFound(job_id)
            needing = self.store.needing(job_id)
            if needing:
                raise StillNeeded(
                    f"job {job_id} is kept: {len(needing)} job(s) not ended need it "
                    f"({', '.join(needing[:5])}): they depend on it, or are turns of its "
                    "chat; remove it once they have ended, or cancel them first")
            return self.store.remove(job_id, job)
