"""The job kinds the API accepts, each the module that runs it as a subprocess."""

from __future__ import annotations

KINDS: dict[str, str] = {
    "chat": "runners.chat",
    "sleep": "runners.sleep",
}
