"""The supervisor's upkeep on a full pass: the logs of runners that print without end
are capped, and old finished jobs are pruned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from jobs import protocol as p
from jobs.protocol.counters import prune_removed_notes
from jobs.settings import PRUNE_INTERVAL_S, PRUNE_OVER_CAP_S
from jobs.store.dependency_lock import DependenciesBusy, dependencies_held
from jobs.store.job_store import JobStore
from jobs.supervisor.lifecycle import JobLife

log = logging.getLogger(__name__)


def cap_logs(running: Iterable[JobLife], log_max_bytes: int | None) -> None:
    """A runner printing without end: its log keeps its head and its latest output."""
    if log_max_bytes is None or not p.LOGS_CUT_WHILE_WRITTEN:
        return
    for life in running:
        if life.run.launcher != p.LOCAL:
            continue  # a remote job's local copy is written and capped by its poller
        dropped = p.cap_log(p.sibling(life.job_file, p.LOG_FILE), log_max_bytes)
        if dropped:
            log.info("job %s: log capped (%d bytes dropped)", life.job_id, dropped)


class Pruning:
    """Prunes the finished jobs past their retention every PRUNE_INTERVAL_S, and every
    PRUNE_OVER_CAP_S while more than `max_jobs` are on disk; `keep()`: the finished jobs
    that queued ones depend on."""

    def __init__(self, store: JobStore, retention_s: float, max_jobs: int | None,
                 min_retention_s: float, keep: Callable[[], set[str]]) -> None:
        self.store = store
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self.min_retention_s = min_retention_s
        self._keep = keep
        self._next_prune = 0.0
        self._pruned_at = 0.0

    def maybe_prune(self, on_disk: int) -> None:
        """`on_disk`: how many jobs the last listing found."""
        now = time.monotonic()
        over_cap = self.max_jobs is not None and on_disk > self.max_jobs
        if now < self._next_prune and not (over_cap and now > self._pruned_at + PRUNE_OVER_CAP_S):
            return
        self._next_prune = now + PRUNE_INTERVAL_S
        self._pruned_at = now
        prune_removed_notes(self.store.dir.parent, time.time())
        with contextlib.ExitStack() as held:
            try:
                # Under the lock a submission with `depends_on` holds from its check to its
                # file: no job is stored depending on one pruned meanwhile. Not waited for
                # (this pass launches and stops jobs): a later pass prunes.
                held.enter_context(dependencies_held(self.store.dir.parent,
                                                     "nothing was pruned", wait_s=0))
            except DependenciesBusy:
                self._next_prune = now + PRUNE_OVER_CAP_S
                return
            removed = self.store.prune(self.retention_s, self.max_jobs,
                                       min_retention_s=self.min_retention_s, keep=self._keep())
        if removed:
            log.info("pruned %d finished jobs (older than %.0f h, or beyond %s jobs; none "
                     "younger than %.0f s)", removed, self.retention_s / 3600, self.max_jobs,
                     self.min_retention_s)
