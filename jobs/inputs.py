"""The input of each built-in kind, checked by the API before a job is created."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class TrainInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(60, ge=1, le=10_000)
    lags: int = Field(30, ge=1, le=600)
    seconds: float = Field(0, ge=0, description="learn from the last N seconds; 0: all")
    learning_rate: float = Field(0.05, gt=0, le=1)
    validation: float = Field(0.2, ge=0.05, le=0.5)
