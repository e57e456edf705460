"""The input of each built-in kind, checked by the API before a job is created."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runners import sleep, train

MAX_MESSAGES = 200
MAX_CONTENT_CHARS = 100_000


def _within(bounds: tuple[float, float, float], **options: Any) -> Any:
    """A field with its runner's (default, lowest, highest): the API refuses with a 422
    what the runner would refuse, and no more."""
    default, low, high = bounds
    return Field(default, ge=low, le=high, **options)


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
    on_busy: Literal["wait", "interrupt"] | None = Field(
        None, description="while an earlier answer of this session_id is queued or running: "
                          "wait for it (the default), or cancel it first")


class SleepInput(BaseModel):
    # Public: nothing here may make a runner misbehave (the tests' knobs are their own kind).
    model_config = ConfigDict(extra="forbid")

    seconds: float = _within(sleep.SECONDS)
    steps: int = _within(sleep.STEPS)


class TrainInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = _within(train.EPOCHS)
    lags: int = _within(train.LAGS)
    seconds: float = _within(train.SECONDS, description="learn from the last N seconds; 0: all")
    learning_rate: float = _within(train.LEARNING_RATE)
    validation: float = _within(train.VALIDATION)
