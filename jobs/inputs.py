"""The input of each built-in kind, checked by the API before a job is created."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from jobs import protocol as p
from runners import chat, sleep, train

MAX_MESSAGES = 200
MAX_CONTENT_CHARS = 100_000


def _within(bounds: tuple[float, float, float], **options: Any) -> Any:
    """A field with its runner's (default, lowest, highest): the API refuses with a 422
    what the runner would refuse, and no more."""
    default, low, high = bounds
    return Field(default, ge=low, le=high, **options)


class Request(BaseModel):
    """A request's body or input: no unknown field, no NaN or Infinity (JSON has neither),
    and each value of its JSON type: no true or false where a number goes, no text where a
    number or a flag goes (pydantic would take true for 1, "5" for 5 and "no" for false,
    so a client's value of the wrong type would pass unseen, stored as another)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # What a field left out (None) means, where that is not None itself: a body that
    # writes it out is the same request (an Idempotency-Key's fingerprint).
    implied: ClassVar[dict[str, Any]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _of_its_json_type(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None or value is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        types = {annotation, *get_args(annotation)}
        if {int, float} & types and isinstance(value, (bool, str)):
            raise ValueError(f"{_said(value)} is no {info.field_name}: give a number")
        if bool in types and not isinstance(value, bool):
            raise ValueError(f"{_said(value)} is no {info.field_name}: give true or false")
        return value


def _said(value: Any) -> str:
    """A value as JSON has it, cut short: `true`, `"5"`."""
    said = json.dumps(value, ensure_ascii=True)
    return said if len(said) <= 40 else f"{said[:40]}…"


class ChatMessage(Request):

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)


class ChatInput(Request):
    """What a chat job needs (the seed's request body, plus optional model options)."""

    implied: ClassVar[dict[str, Any]] = {"expert": True, "on_busy": "wait"}

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    session_id: str | None = Field(None, max_length=200)
    context: str | None = Field(None, max_length=20_000,
                                description="what the expert is told about the dashboard; "
                                            "by default a summary of the last ten minutes")
    expert: bool | None = Field(None, description="false: no dashboard-expert system prompt")
    max_tokens: int | None = Field(None, ge=chat.MAX_TOKENS[0], le=chat.MAX_TOKENS[1])
    temperature: float | None = Field(None, ge=chat.TEMPERATURE[0], le=chat.TEMPERATURE[1])
    on_busy: Literal["wait", "interrupt"] | None = Field(
        None, description="while an earlier answer of this session_id is queued or running: "
                          "wait for it (the default), or cancel it first")
    follows: str | None = Field(
        None, description="the job id of the newest turn of session_id that messages carry: "
                          "refused (410) once that turn is gone, as when the conversation "
                          "was forgotten")

    @field_validator("session_id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # /api/sessions/{id} refuses a path with one: such a conversation could never
        # be shown or forgotten.
        if value is not None and re.search("[\x00-\x1f\x7f]", value):
            raise ValueError("a session_id holds no control character (a tab, a newline)")
        # Empty is none, as a client without a conversation may send it: a conversation
        # under "" could be neither shown nor forgotten (/api/sessions/ names none).
        return value or None

    @field_validator("follows")
    @classmethod
    def _a_turns_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not p.is_valid_id(value):
            raise ValueError("follows is a turn's job id: 32 lowercase hex characters")
        if value is not None and not info.data.get("session_id"):
            raise ValueError("follows names a turn of the conversation: send its session_id")
        return value


class SleepInput(Request):
    # Public: nothing here may make a runner misbehave (the tests' knobs are their own kind).

    seconds: float = _within(sleep.SECONDS)
    steps: int = _within(sleep.STEPS)


class TrainInput(Request):

    epochs: int = _within(train.EPOCHS)
    lags: int = _within(train.LAGS)
    seconds: float = _within(train.SECONDS, description="learn from the last N seconds; 0: all")
    learning_rate: float = _within(train.LEARNING_RATE)
    validation: float = _within(train.VALIDATION)
