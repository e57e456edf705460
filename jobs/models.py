"""The job file as the API shows it, and the API's requests and answers (pydantic).
The fields are those of docs/contract.md; each kind's input model is in `jobs.inputs`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.kinds import registry
from jobs.protocol import ErrorType, JobState
from jobs.settings import MAX_TIMEOUT_S


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


class ChatUsage(BaseModel):
    """A completed chat's `result.usage`."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_s: float | None = None  # decoding: from the first token to the last
    counted: bool = False  # true: counted by Offload (the prompt estimated), not the server's


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
    after: str | None = None  # a chat: the earlier job of its session, answered first
    rerun_of: str | None = None  # the job this one runs again
    schedule: str | None = None  # the schedule that created it


# -- requests ---------------------------------------------------------------------------

def _known_kinds(schema: dict[str, Any]) -> None:
    # Documented as an enum; checked in the service, whose 422 lists the known kinds.
    schema["enum"] = sorted(registry())


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(max_length=64, json_schema_extra=_known_kinds)
    input: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)


class JobRerun(BaseModel):
    """Run a job again: its kind, and its input unless this gives another."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] | None = None
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)


class Submitted(BaseModel):
    job_id: str
    status: Literal["processing"] = "processing"


class ChatResult(BaseModel):
    status: Literal["processing", "completed", "error", "not_found"]
    reply: str | None = None
    usage: ChatUsage | None = None
    message: str | None = None


class JobList(BaseModel):
    jobs: list[Job]
