"""GLM-4 tool calls <-> OpenAI-style ``tool_calls``.

GLM-4 answers a tool call as ``<|assistant|>NAME\\n{json arguments}`` (the line after ``<|assistant|>`` is the
message's *metadata*; it is empty for a plain answer, which therefore starts with a newline). Results go back
as ``observation`` messages. Builtin tools (``python``, ``simple_browser``, ``cogview``) carry code or text
after the newline, not necessarily JSON.

A non-empty metadata line naming a builtin is a call to it whether or not the request listed it (that is
what the format says, and GLM-4's demo server does the same); an unknown name is plain text.

Choices made here (GLM-4's own OpenAI-compatible demo server differs on the first two):
- a builtin call's ``arguments`` is the raw payload (code, a query), so feeding it back reproduces exactly the
  text the model wrote;
- a function call's ``arguments`` is the model's JSON text, checked (must be a JSON object) but not re-dumped;
- the caller's own system message is kept next to the tools' system message (the demo server drops it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BUILTIN_TOOLS = frozenset({"python", "simple_browser", "cogview"})


class ToolCallError(ValueError):
    """The model called a tool with arguments that cannot be used (see :attr:`ParsedOutput.error`)."""


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ParsedOutput:
    """The assistant's answer: text, tool calls (OpenAI dicts), or an error saying what is wrong."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def raise_for_error(self) -> ParsedOutput:
        if self.error is not None:
            raise ToolCallError(self.error)
        return self

    def to_openai_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> tuple[set[str], set[str]]:
    """(function tool names, builtin tool names) offered by a request's ``tools``."""
    functions: set[str] = set()
    builtins: set[str] = set()
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be a dict like {{'type': 'function', 'function': {{'name': ...}}}}")
        kind = tool.get("type", "function")
        if kind == "function":
            fn = tool.get("function", tool)
            name = fn.get("name") if isinstance(fn, Mapping) else None
            if not isinstance(name, str) or not name:
                raise ValueError(f"tools[{i}] is a function tool without a function.name")
            functions.add(name)
        elif kind in BUILTIN_TOOLS:
            builtins.add(kind)
        else:
            raise ValueError(
                f"tools[{i}] has unknown type {kind!r}; expected 'function' or one of {sorted(BUILTIN_TOOLS)}"
            )
    return functions, builtins


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_assistant_output(text: str, tools: Sequence[Mapping[str, Any]] | None) -> ParsedOutput:
    """Parse the decoded text generated after ``<|assistant|>`` (up to the stop token).

    ``NAME\\n{...}`` is a tool call when NAME is a function tool offered in ``tools`` or a builtin;
    anything else is text. Several calls may be separated by ``<|assistant|>`` (when decoded with special
    tokens kept). Malformed JSON for a function tool is not turned into text silently: ``error`` says what
    is wrong and ``content`` keeps the raw output.
    """
    if not isinstance(text, str):
        raise TypeError(f"assistant output must be a str, got {type(text).__name__}")
    functions, _ = tool_names(tools)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for segment in text.split("<|assistant|>"):
        metadata, sep, payload = segment.partition("\n")
        name = metadata.strip()
        if sep and name in functions:
            arguments = payload.strip()
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as exc:
                return ParsedOutput(
                    content=text.strip(),
                    error=f"the model called tool {name!r} with arguments that are not valid JSON ({exc}): "
                    f"{arguments[:200]!r}",
                )
            if not isinstance(parsed, dict):
                return ParsedOutput(
                    content=text.strip(),
                    error=f"the model called tool {name!r} with JSON arguments that are a "
                    f"{type(parsed).__name__}, not an object",
                )
            calls.append(_call(name, arguments))
        elif sep and name in BUILTIN_TOOLS:
            calls.append(_call(name, payload.strip()))
        elif not sep or name:
            texts.append(segment.strip())  # no metadata line, or one that names no tool: plain text
        else:
            texts.append(payload.strip())
    content = "\n".join(t for t in texts if t)
    return ParsedOutput(content=content or (None if calls else ""), tool_calls=calls)


def _text_content(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of text parts (GLM-4-9B-chat is text-only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"{where}.content[{j}] is a {kind!r} part; GLM-4 chat takes text parts only")
        return "".join(pieces)
    raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def _arguments_text(arguments: Any, where: str) -> str:
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, Mapping):
        return json.dumps(arguments, ensure_ascii=False)
    raise ValueError(f"{where}.function.arguments must be a JSON string (or an object), got {type(arguments).__name__}")


def openai_to_glm_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Map an OpenAI-style conversation onto GLM-4's chat-template messages.

    Tools ride on a leading system message; an assistant ``tool_calls`` entry becomes an assistant message
    with ``metadata`` = function name and ``content`` = the arguments JSON; ``tool`` (and legacy ``function``)
    messages become ``observation`` messages; ``developer`` is treated as ``system``.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, Any]] = []
    if tools:
        tool_names(tools)  # validates
        out.append({"role": "system", "content": "", "tools": [dict(t) for t in tools]})
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role in ("system", "developer", "user"):
            out.append(
                {
                    "role": "user" if role == "user" else "system",
                    "content": _text_content(message.get("content"), where),
                }
            )
        elif role == "assistant":
            content = _text_content(message.get("content"), where)
            calls = list(message.get("tool_calls") or ())
            if message.get("function_call"):
                calls.append({"type": "function", "function": message["function_call"]})
            if content or not calls:
                out.append({"role": "assistant", "content": content})
            for j, call in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise ValueError(
                        f"{cw} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}"
                    )
                out.append(
                    {
                        "role": "assistant",
                        "metadata": fn["name"],
                        "content": _arguments_text(fn.get("arguments", "{}"), cw),
                    }
                )
        elif role in ("tool", "function", "observation"):
            out.append({"role": "observation", "content": _text_content(message.get("content"), where)})
        else:
            raise ValueError(f"{where} has unknown role {role!r}; expected system, developer, user, assistant or tool")
    return out
