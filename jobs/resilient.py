"""Background work that must not die silently: the API's tasks and the supervisor's
helpers run under `resilient`, which logs a failure and starts the work again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RESTART_S = 5.0


async def resilient(name: str, start: Callable[[], Awaitable[None]],
                    pause_s: float = RESTART_S) -> None:
    """Run `start()` until it returns; when it fails (say, the data folder went
    read-only), log why and start it again after `pause_s`. Cancelling stops it."""
    while True:
        try:
            await start()
            return
        except Exception:
            log.exception("%s failed; starting it again in %g s", name, pause_s)
            await asyncio.sleep(pause_s)
