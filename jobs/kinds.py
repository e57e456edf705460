"""The job kinds the API accepts: the runner module of each and the model of its input."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from jobs.models import ChatInput, SleepInput


@dataclass(frozen=True)
class Kind:
    module: str  # run as `python -m <module> --job-file F`
    input_model: type[BaseModel] | None = None  # None: any JSON object


REGISTRY: dict[str, Kind] = {
    "chat": Kind("runners.chat", ChatInput),
    "sleep": Kind("runners.sleep", SleepInput),
}

# kind -> runner module, for the supervisor
KINDS: dict[str, str] = {name: kind.module for name, kind in REGISTRY.items()}
