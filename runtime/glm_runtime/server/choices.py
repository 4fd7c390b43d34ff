"""One choice of a response: the engine thread's tokens relayed to the event loop, and what the finished
choice says (text, tool calls, finish reason). Shared by streamed and whole responses."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from glm_runtime.api import LLM, RowText
from glm_runtime.scheduler import Sequence
from glm_runtime.server.errors import APIError
from glm_runtime.tool_calls import tool_names

log = logging.getLogger("glm_runtime.server")


class Relay:
    """A sequence's :class:`~glm_runtime.scheduler.Listener`: text per token (in the engine thread, where a
    stop string must end the sequence before the next step), events to the request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], index: int,
                 text: RowText | None) -> None:
        self.loop, self.queue, self.index, self.text = loop, queue, index, text
        self.stopped_by_string = False

    def _put(self, item: tuple[Any, ...]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the request is gone
            pass

    def on_token(self, seq: Sequence, token: int) -> bool:
        text, hit = self.text.feed(token) if self.text is not None else ("", False)
        self.stopped_by_string = hit
        self._put(("token", self.index, text, token))
        return hit

    def on_finish(self, seq: Sequence) -> None:
        tail = ""
        if self.text is not None and seq.finish_reason in ("stop", "length"):
            tail = self.text.finish(self.stopped_by_string)
        self._put(("finish", self.index, tail, seq))


@dataclass
class Choice:
    """One choice of a response as it is built (the same for streamed and whole responses)."""

    index: int
    seq: Sequence
    relay: Relay
    parts: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    forced: str | None = None  # a tool name put on the answer's metadata line by tool_choice
    done: bool = False
    seen: int = 0  # token events received (streaming: which logprobs entries exist)
    sent: int = 0  # logprobs entries already streamed


def chat_result(llm: LLM, choice: Choice) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason of a finished chat choice (tool calls parsed from its ids)."""
    seq = choice.seq
    text = "".join(choice.parts)
    reason = finish_reason(seq)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    assistant = choice.relay.text.assistant if choice.relay.text is not None else None
    if choice.tools and llm.tokenizer is not None and (choice.forced or (assistant and assistant.mode == "tool")):
        parsed = llm.parse_tool_calls(seq.output, seq.stop_ids, choice.tools,
                                      prefix=f"{choice.forced}\n" if choice.forced else "")
        if parsed.tool_calls:
            message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}
            reason = "tool_calls"
        else:  # not a usable call: the raw answer as text (the error is logged, the client sees the text)
            message["content"] = parsed.content if parsed.content is not None else text
            if parsed.error:
                log.info("tool call not usable: %s", parsed.error)
    return message, reason


def finish_reason(seq: Sequence) -> str:
    return {"stop": "stop", "length": "length"}.get(seq.finish_reason or "", seq.finish_reason or "stop")


def resolve_tool_choice(tools: list[dict[str, Any]] | None,
                        choice: str | dict[str, Any] | None) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(tools to offer, function name to force)``. GLM-4's answer starts with a metadata line naming the tool:
    putting a name there forces a call to that tool; its arguments (and, for ``required`` among several tools,
    the name) are then constrained by a grammar (:mod:`glm_runtime.server.structured`)."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, None
    functions, _ = tool_names(tools) if isinstance(tools, list) else (set(), set())
    if choice in (None, "auto"):
        return tools, None
    if choice == "none":
        return None, None  # not offered: the model cannot call them
    if choice == "required":
        if len(functions) == 1:
            return tools, next(iter(functions))
        if not functions:
            raise APIError(400, "tool_choice 'required' needs a function tool", param="tool_choice")
        return tools, None  # one of several: the grammar (server.structured) makes the answer a call
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") == "function" and isinstance(name, str):
            if name not in functions:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
            return tools, name
    raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                        f"{{'name': ...}}}}, got {choice!r}", param="tool_choice")
