"""Request and response models of the OpenAI-compatible chat endpoint, and of the stored record."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 32_000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """No lone surrogate (`"\\ud800"` in JSON): such a string cannot be written as UTF-8, so it could be neither
    recorded nor sent to vLLM."""
    if (found := _SURROGATE.search(text)) is not None:
        raise ValueError(f"lone surrogate {found.group()!r} is not valid Unicode text")
    return text


def printable(text: str) -> str:
    """Valid Unicode text with no control characters but tab and newline. NUL cannot be stored by PostgreSQL (an
    event acknowledged and never stored); the others only hide text from whoever reads it."""
    if (found := _CONTROL.search(text)) is not None:
        raise ValueError(f"control character {found.group()!r} is not allowed (tab and newline are)")
    return encodable(text)


Printable = Annotated[str, AfterValidator(printable)]
"""A client string that is stored and shown: names, users, comments, edits."""

Text = Annotated[str, AfterValidator(encodable)]
"""Client text sent on to vLLM and recorded: message contents."""

StopString = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(encodable)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text = Field(max_length=MAX_CONTENT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] = Field(max_length=MAX_CONTENT_CHARS)
    name: Printable | None = Field(None, max_length=64)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat request that pairloop serves. Unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: Text | None = Field(None, max_length=256)
    n: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: StopString | list[StopString] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 2)  # vLLM seeds choice i with seed + i
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Printable | None = Field(None, max_length=256)


class SamplingParams(BaseModel):
    """The sampling parameters a completion was served with (what vLLM received)."""

    n: int
    temperature: float
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ServedChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    adapter: str
    """The vLLM model name that produced this choice: the base model's name or an adapter version."""


class CompletionRecord(BaseModel):
    """What the gateway served for one request: the ground truth that feedback refers to."""

    id: str
    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingParams
    choices: list[ServedChoice]
    key_id: str
    user: str | None
    stream: bool
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: float
    finished_at: float
    expires_at: float
