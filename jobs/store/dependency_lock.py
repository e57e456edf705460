"""The lock that keeps a job from being stored depending on one removed at that moment.

Held while a job with `depends_on` is checked and stored (the API), while a finished job
is found needed by none and removed (`POST /api/jobs/{id}/remove`), and while old jobs are
pruned (the supervisor): one or the other, never both at once. Without it, a job could
be stored depending on one deleted a moment after its check, and fail `dependency` ("is
gone") for a job its submission was told was there. A file lock in the data folder:
every API worker and the supervisor of the folder take turns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from jobs.store.errors import StoreUnavailable

DEPENDENCIES_LOCK = "dependencies.lock"
WAIT_S = 10.0


class DependenciesBusy(Exception):
    """The lock was held by another for longer than its wait (a long pruning): a 503 to
    retry, not a problem of the data folder."""


@contextlib.contextmanager
def dependencies_held(data_dir: Path, outcome: str, wait_s: float = WAIT_S
                      ) -> Iterator[None]:
    """The lock held for the block; `outcome`: what does not happen without it, said."""
    lock = FileLock(os.path.join(data_dir, DEPENDENCIES_LOCK), timeout=wait_s)
    try:
        lock.acquire()
    except Timeout:
        raise DependenciesBusy(f"{DEPENDENCIES_LOCK} in the data folder was held for over "
                               f"{wait_s:g} s (by a removal or the pruning of old jobs): "
                               f"{outcome}; retry in a moment") from None
    except OSError as exc:
        raise StoreUnavailable(f"cannot open {DEPENDENCIES_LOCK} in the data folder: {exc}",
                               outcome=outcome[:1].upper() + outcome[1:]) from exc
    try:
        yield
    finally:
        lock.release()
