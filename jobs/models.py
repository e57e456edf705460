"""The job of CONTRACT.md as pydantic models (the API's view of a job file)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs import protocol as p
from jobs.settings import MAX_TIMEOUT_S


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
    loss_curve: list[float] | None = None  # training: the loss of each epoch so far
    launcher: Literal["local", "ray"] | None = None  # where it ran (null until it starts)
    host: str | None = None  # the machine its runner ran on


# -- requests ---------------------------------------------------------------------------

MAX_MESSAGES = 200
MAX_CONTENT_CHARS = 100_000


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)


class ChatInput(BaseModel):
    """What a chat job needs (the seed's request body, plus optional model options)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    session_id: str | None = Field(None, max_length=200)
    context: str | None = Field(None, max_length=20_000,
                                description="what the expert is told about the dashboard; "
                                            "by default a summary of the last ten minutes")
    expert: bool | None = Field(None, description="false: no dashboard-expert system prompt")
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2)


class SleepInput(BaseModel):
    # Public: nothing here may make a runner misbehave (the tests' knobs are their own kind).
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(0, ge=0, le=3600)
    steps: int = Field(10, ge=1, le=10_000)


def _known_kinds(schema: dict[str, Any]) -> None:
    from jobs.kinds import REGISTRY  # late: the registry imports these models

    # Documented as an enum; checked in the service, whose 422 lists the known kinds.
    schema["enum"] = sorted(REGISTRY)


class TrainInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(60, ge=1, le=10_000)
    lags: int = Field(30, ge=1, le=600)
    seconds: float = Field(0, ge=0, description="learn from the last N seconds; 0: all")
    learning_rate: float = Field(0.05, gt=0, le=1)
    validation: float = Field(0.2, ge=0.05, le=0.5)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(max_length=64, json_schema_extra=_known_kinds)
    input: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)


class Submitted(BaseModel):
    job_id: str
    status: Literal["processing"] = "processing"


class ChatResult(BaseModel):
    status: Literal["processing", "completed", "error", "not_found"]
    reply: str | None = None
    message: str | None = None


class JobList(BaseModel):
    jobs: list[Job]
