"""What the index keeps of one job: a few fields of every job, the whole job only while
it is live (or just finished)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from jobs import protocol as p
from jobs.store.reading import stat_signature


class Live:
    """What only a live (or just finished) job needs: its file's signature and data."""

    __slots__ = ("signature", "mtime_ns", "data", "looked_at")

    def __init__(self, st: os.stat_result, data: dict[str, Any]) -> None:
        self.signature = stat_signature(st)
        self.mtime_ns = st.st_mtime_ns
        self.data = data
        self.looked_at = time.monotonic()  # its file's last stat, by the index


class Entry:
    """What the index keeps of one job: enough to list, count and prune it. A settled
    job's entry is a few pointers (its strings are shared), so thousands cost little."""

    __slots__ = ("state", "kind", "finished_ts", "session", "live")

    def __init__(self, data: dict[str, Any], live: Live | None) -> None:
        self.state = sys.intern(str(data.get(p.F_STATE)))
        self.kind = sys.intern(str(data.get(p.F_KIND)))
        finished = data.get(p.F_FINISHED_AT) or data.get(p.F_CREATED_AT)
        try:
            self.finished_ts = p.parse_iso(str(finished))
        except ValueError:
            self.finished_ts = 0.0
        self.session = p.chat_session(self.kind, data.get(p.F_INPUT))
        self.live = live
