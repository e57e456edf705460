"""The job file as the API shows it, and the API's requests and answers (pydantic).
The fields are those of docs/contract.md; each kind's input model is in `jobs.inputs`."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from jobs.inputs import Request
from jobs.kinds import Launch, registry
from jobs.protocol import ErrorType, JobState, is_valid_id, iso
from jobs.settings import (
    MAX_ATTEMPTS,
    MAX_BATCH,
    MAX_DELAY_S,
    MAX_DEPENDENCIES,
    MAX_PRIORITY,
    MAX_TIMEOUT_S,
    RUN_AT_PAST_S,
)


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return iso(value.timestamp())


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")  # as pydantic reads one
JOB_ID_SCHEMA = {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"}


def _one_as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


def job_ids(given: object, most: int) -> list[str]:
    """A list of 1 to `most` job ids, each in any case and kept once; said plainly if not."""
    if not isinstance(given, list) or not 1 <= len(given) or not all(
            isinstance(each, str) for each in given):
        raise ValueError("give a job's id (32 hex characters, as a listing shows) or a "
                         f"list of 1 to {most} of them")
    ids = list(dict.fromkeys(each.strip().lower() for each in given))
    if len(ids) > most:
        raise ValueError(f"at most {most} jobs, not {len(ids)}")
    wrong = next((each for each in ids if not is_valid_id(each)), None)
    if wrong is not None:
        raise ValueError(f"{wrong[:80]!r} is no job's id (32 hex characters, as a listing "
                         "shows)")
    return ids


# Answered as the job file has it (milliseconds), not as pydantic writes a datetime.
Time = Annotated[datetime, PlainSerializer(_iso, when_used="json"),
                 WithJsonSchema({"type": "string", "format": "date-time"})]


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


class EarlierError(BaseModel):
    """The error an earlier attempt of a retried job ended with."""

    attempt: int
    type: ErrorType
    message: str
    finished_at: Time | None = None


class WaitsFor(BaseModel):
    """Why a queued job has not started: `reason` names the field that says more
    (`depends_on`, `after`, `run_at`, `queue_position`), or is `kind_cap` or
    `model_slots` (a chat)."""

    reason: Literal["depends_on", "after", "run_at", "kind_cap", "model_slots",
                    "queue_position"]
    jobs: list[str] | None = None  # depends_on, after: those it waits for, not ended yet
    kind_cap: int | None = None  # kind_cap: its kind's cap in use
    model_slots: int | None = None  # model_slots: the embedded model's slots
    running: int | None = None  # kind_cap, model_slots: the jobs of its kind running now


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    kind: str
    state: JobState
    created_at: Time
    started_at: Time | None = None
    finished_at: Time | None = None
    timeout_s: float | None = None
    queue_position: int | None = None
    waits_for: WaitsFor | None = None  # queued: why it has not started
    progress: Progress | None = None
    output: str | None = None
    result: dict[str, Any] | None = None
    error: JobError | None = None
    pid: int | None = None
    exit_code: int | None = None
    resources: Resources | None = None
    input: dict[str, Any] | None = None
    # A summary listing's, in place of `input`: the start of its JSON ("…" when cut).
    input_preview: str | None = None
    loss_curve: list[float] | None = None  # training: the loss of each epoch so far
    launcher: Literal["local", "ray"] | None = None  # where it ran (null until it starts)
    host: str | None = None  # the machine its runner ran on
    after: str | None = None  # a chat: the earlier job of its session, answered first
    rerun_of: str | None = None  # the job this one runs again
    priority: int | None = None  # higher starts first
    run_at: Time | None = None  # queued, it starts no earlier
    attempt: int | None = None  # 1-based (null: 1)
    max_attempts: int | None = None  # null: 1
    earlier_errors: list[EarlierError] | None = None  # of the attempts before this one
    schedule: str | None = None  # the schedule that created it
    # Starts once they all completed (one id alone, as a job file may say it: a list).
    depends_on: Annotated[Annotated[list[str], Field(max_length=MAX_DEPENDENCIES)] | None,
                          BeforeValidator(_one_as_list)] = None


# -- requests ---------------------------------------------------------------------------

def _known_kinds(schema: dict[str, Any]) -> None:
    # Documented as an enum; checked in the service, whose 422 lists the known kinds.
    schema["enum"] = sorted(registry())


class JobCreate(Request):

    kind: str = Field(max_length=64, json_schema_extra=_known_kinds)
    input: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)
    priority: int | None = Field(None, ge=-MAX_PRIORITY, le=MAX_PRIORITY,
                                 description="higher starts first; by default chat 10, "
                                             "any other kind 0")
    run_at: datetime | None = Field(None, description="start no earlier (ISO 8601; a time "
                                                      "without a zone is UTC)")
    delay_s: float | None = Field(None, ge=0, le=MAX_DELAY_S,
                                  description="start no earlier than this many seconds after "
                                              "its creation (`created_at`)")
    max_attempts: int | None = Field(None, ge=1, le=MAX_ATTEMPTS,
                                     description="attempts on transient failures; by default "
                                                 "as OFFLOAD_MAX_ATTEMPTS says")
    depends_on: Annotated[list[str] | None, WithJsonSchema({"anyOf": [
        JOB_ID_SCHEMA, {"type": "array", "items": JOB_ID_SCHEMA, "minItems": 1,
                        "maxItems": MAX_DEPENDENCIES}, {"type": "null"}]})] = Field(
        None, description="the id of a job, or a list of them: this one starts once they "
                          "have all completed, and fails (error type `dependency`) as soon "
                          "as one ends otherwise")

    @field_validator("run_at", mode="before")
    @classmethod
    def _a_time_not_a_number(cls, value: object) -> object:
        # pydantic takes a number as POSIX seconds or milliseconds: "3600" meant as a delay
        # was a time in 1970, "give a time zone".
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and \
                _NUMBER.fullmatch(str(value)):
            raise ValueError("not a number but a time in ISO 8601, such as "
                             "2026-12-24T18:00:00Z; to start in a number of seconds, give "
                             "delay_s")
        return value

    @field_validator("run_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        zoned = value.tzinfo is not None
        if not zoned:
            value = value.replace(tzinfo=timezone.utc)
        ahead = (value - datetime.now(timezone.utc)).total_seconds()
        if ahead > MAX_DELAY_S:
            raise ValueError(f"more than {MAX_DELAY_S / 86400:g} days ahead")
        if ahead < -RUN_AT_PAST_S:
            hint = "" if zoned else "give a time zone (a time without one is UTC), or "
            raise ValueError(f"{-ahead / 3600:.1f} h in the past; {hint}leave "
                             "run_at out to start now")
        return value

    @field_validator("depends_on", mode="before")
    @classmethod
    def _job_ids(cls, value: object) -> list[str] | None:
        return None if value is None else job_ids(_one_as_list(value), MAX_DEPENDENCIES)

    @model_validator(mode="after")
    def _one_start_time(self) -> JobCreate:
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give run_at or delay_s, not both")
        return self

    def launch(self) -> Launch:
        """When and how often it runs: a `delay_s` counts from the job's creation."""
        return Launch(self.priority, None if self.run_at is None else self.run_at.timestamp(),
                      self.max_attempts, self.delay_s, tuple(self.depends_on or ()))


class JobBatch(Request):
    """Several jobs in one request, stored in this order."""

    jobs: list[JobCreate] = Field(min_length=1)

    @field_validator("jobs", mode="before")
    @classmethod
    def _at_most(cls, value: object) -> object:
        if isinstance(value, list) and len(value) > MAX_BATCH:  # before each is looked at
            raise ValueError(f"at most {MAX_BATCH} jobs in one request, not {len(value)}: "
                             "send them in several")
        return value


class JobIds(Request):
    """Jobs named by their ids (`POST /api/jobs/cancel`)."""

    ids: Annotated[list[str], WithJsonSchema({"anyOf": [JOB_ID_SCHEMA, {
        "type": "array", "items": JOB_ID_SCHEMA, "minItems": 1, "maxItems": MAX_BATCH}]})]

    @field_validator("ids", mode="before")
    @classmethod
    def _job_ids(cls, value: object) -> list[str]:
        return job_ids(_one_as_list(value), MAX_BATCH)


class JobRerun(Request):
    """Run a job again: its kind, and its input unless this gives another."""

    input: dict[str, Any] | None = None
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)


class Submitted(BaseModel):
    job_id: str
    status: Literal["processing"] = "processing"


class ChatResult(BaseModel):
    status: Literal["processing", "completed", "error", "not_found"]
    state: JobState | None = None  # processing: queued or running
    reply: str | None = None
    usage: ChatUsage | None = None
    message: str | None = None


class ChatResultRefused(ChatResult):
    """A malformed id's `not_found` (a 404): what is wrong with it, as every error says."""

    detail: str


class BatchAnswer(BaseModel):
    """The jobs of a batch, in its order."""

    jobs: list[Job]


class CancelAnswer(BaseModel):
    """Jobs cancelled together: each asked to stop, as it is after the wait (`cancelled`, or
    as it ended meanwhile; still `running` where its stop outlasted the wait); those that
    had finished already, untouched; the ids of no job here (removed, pruned, or never)."""

    jobs: list[Job]
    finished: list[Job]
    missing: list[str]


class BatchRefusal(BaseModel):
    """A batch refused at one of its jobs: `detail` as for that job alone, naming its place
    (`jobs[2]: ...`); `stored`: the ids of the jobs stored before it, which the same batch
    sent again with its Idempotency-Key answers, storing the rest."""

    detail: str
    stored: list[str] = Field(default_factory=list)


class JobList(BaseModel):
    jobs: list[Job]
    # The `before` that lists the next, older page; null: this page reaches the oldest.
    next_before: str | None = None
