"""Request bodies (pydantic: a wrong type is a 400 naming the field, never a 500 further in)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    """Fields both generation endpoints take."""

    # Unknown fields are ignored (new OpenAI fields must not break old servers); known ones are type-checked
    # strictly: "5" is not an integer.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    user: str | None = None


class ChatMessage(BaseModel):
    """The shape of a message (types only; roles and content parts are checked by ``openai_to_glm_messages``)."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
