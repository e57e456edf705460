"""The job of CONTRACT.md as pydantic models (the API's view of a job file)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict

from jobs import protocol as p


class JobState(str, Enum):
    queued = p.QUEUED
    running = p.RUNNING
    completed = p.COMPLETED
    failed = p.FAILED
    cancelled = p.CANCELLED
    timeout = p.TIMEOUT

    @property
    def is_final(self) -> bool:
        return self.value in p.FINAL_STATES


class ErrorType(str, Enum):
    lost = p.ERR_LOST
    timeout = p.ERR_TIMEOUT
    cancelled = p.ERR_CANCELLED
    provider = p.ERR_PROVIDER
    runner = p.ERR_RUNNER
    corrupt = p.ERR_CORRUPT


class Progress(BaseModel):
    fraction: float | None = None
    message: str | None = None


class JobError(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. log_tail for lost runners

    type: ErrorType
    message: str


class Resources(BaseModel):
    cpu_s: float | None = None
    peak_rss_mb: float | None = None


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    kind: str
    state: JobState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timeout_s: float | None = None
    queue_position: int | None = None
    progress: Progress | None = None
    output: str | None = None
    result: dict[str, Any] | None = None
    error: JobError | None = None
    pid: int | None = None
    exit_code: int | None = None
    resources: Resources | None = None
    input: dict[str, Any] | None = None
