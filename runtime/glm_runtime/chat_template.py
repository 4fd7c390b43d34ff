"""Render a checkpoint's Jinja ``chat_template`` as transformers' ``apply_chat_template`` does, sandboxed.

The template is data read from ``tokenizer_config.json``; it runs in jinja2's
``ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation of the caller's
data), with the environment transformers gives chat templates: ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` filter that keeps non-ASCII text (``ensure_ascii=False``) and takes
``indent``, ``raise_exception`` and ``strftime_now``. Like transformers, keys whose value is ``None`` are
dropped from messages (templates test ``is defined`` or truthiness; ``None`` would print as "None").

``tools=``: GLM-4's templates read tools from a message (``item['tools']``), not from a top-level ``tools``
variable, so transformers' ``apply_chat_template(..., tools=...)`` silently drops them for GLM-4. Here,
when the template does not read a top-level ``tools``, the tools ride on a leading system message, which is
what GLM-4's own OpenAI-compatible server does; templates that do read ``tools`` get it as transformers
passes it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Roles GLM-4's chat format has special tokens for.
GLM_ROLES = frozenset({"system", "user", "assistant", "observation"})
#: Seconds one rendering may take. GLM-4's own template renders a long conversation in milliseconds; a template
#: with nested loops (each under the sandbox's range limit) ran for ever, pinning a server thread (issue 19, D7).
RENDER_DEADLINE_S = 2.0
#: Largest string/list a template may build with ``*``, and largest integer (in bits) with ``**``: work done inside
#: one C call that no deadline can interrupt.
MAX_REPEAT_ITEMS = 1 << 20
MAX_POWER_BITS = 1 << 14


class ChatTemplateError(ValueError):
    """Bad messages for the chat template, or the template itself failed (its message says why)."""


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes and cannot indent; chat templates expect transformers' variant.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, as transformers' does (no dunder plumbing)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with ``*`` and ``**`` bounded (a single C call allocating gigabytes, or computing a
    million-digit power, cannot be stopped by the render deadline)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT_ITEMS:
                    raise jinja2.exceptions.SecurityError(f"the template builds a sequence of {len(seq) * n} items "
                                                          f"(limit {MAX_REPEAT_ITEMS})")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            bits = right * math.log2(abs(left))
            if bits > MAX_POWER_BITS:
                raise jinja2.exceptions.SecurityError(f"the template computes a {bits:.0f}-bit power "
                                                      f"(limit {MAX_POWER_BITS})")
        return super().call_binop(context, operator, left, right)


class TemplateDeadlineError(ChatTemplateError):
    """The template ran past its render deadline."""


def _with_deadline(fn: Callable[[], str], seconds: float) -> str:
    """``fn()`` (a render), stopped with :class:`TemplateDeadlineError` once it runs ``seconds``.

    A thread cannot be killed, so the deadline is checked from a trace function on every line executed in the
    template's own compiled code (jinja2 compiles to Python with the file name ``<template>``); other code runs
    untraced, at full speed. The trace is per thread, and the caller's own trace function (a debugger, coverage)
    is put back afterwards.
    """
    end = time.monotonic() + seconds

    def in_template(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > end:
            raise TemplateDeadlineError(f"the chat template did not finish rendering within {seconds:g} s "
                                        "(unbounded loops?); fix the template in tokenizer_config.json")
        return in_template

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return in_template if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return fn()
    finally:
        sys.settrace(previous)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same one for every request)."""
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("chat template must be a non-empty string")
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc} (line {exc.lineno})") from exc


def _plain(value: Any, where: str) -> Any:
    """A fresh copy made of JSON types only: what the template sees can't reach the caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ChatTemplateError(
        f"{where} is a {type(value).__name__}; chat data must be JSON-like (str, number, list, dict)"
    )


def _check_tools(tools: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"{where} must be a list of tool dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("type"), str):
            raise ChatTemplateError(
                f"{where}[{i}] must be a dict with a 'type' ('function', 'python', 'simple_browser', 'cogview')"
            )
        if tool["type"] == "function" and not (
            isinstance(tool.get("function"), Mapping) and isinstance(tool["function"].get("name"), str)
        ):
            raise ChatTemplateError(f"{where}[{i}] is a function tool without function.name")
    return _plain(list(tools), where)


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], roles: frozenset[str] | None = GLM_ROLES
) -> list[dict[str, Any]]:
    """Validated copies of ``messages`` with ``None`` values dropped (as transformers does).

    Each message needs a ``role`` (one of ``roles``) and a string ``content`` (or none); ``metadata`` must
    be a string; ``tools`` a list of tool dicts.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] is a {type(message).__name__}, not a dict with role/content")
        msg = {k: v for k, v in message.items() if v is not None}
        role = msg.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"messages[{i}] has no string 'role'")
        if roles is not None and role not in roles:
            hint = " (OpenAI-style 'tool' messages: use glm_runtime.tool_calls.openai_to_glm_messages)"
            raise ChatTemplateError(
                f"messages[{i}] has unknown role {role!r}; expected one of {sorted(roles)}"
                + (hint if role in ("tool", "function", "developer") else "")
            )
        if "content" in msg and not isinstance(msg["content"], str):
            raise ChatTemplateError(
                f"messages[{i}] content is a {type(msg['content']).__name__}, not a string "
                "(content parts and tool_calls: convert with glm_runtime.tool_calls.openai_to_glm_messages)"
            )
        if "metadata" in msg and not isinstance(msg["metadata"], str):
            raise ChatTemplateError(f"messages[{i}] metadata must be a string (GLM-4: the called tool's name)")
        if "tools" in msg:
            msg["tools"] = _check_tools(msg["tools"], f"messages[{i}].tools")
        out.append(_plain(msg, f"messages[{i}]"))
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    deadline_s: float = RENDER_DEADLINE_S,
    **extra: Any,
) -> str:
    """Render ``template`` over ``messages`` like transformers' ``apply_chat_template(tokenize=False)``.

    ``tools`` go to the template's top-level ``tools`` when it reads one, else onto a leading system message
    (module docstring). ``extra`` become template variables. Each rendering must finish within ``deadline_s``
    (:class:`TemplateDeadlineError` otherwise).
    """
    compiled = compile_chat_template(template)
    msgs = normalize_messages(messages)
    tool_list = _check_tools(tools, "tools") if tools else None
    variables = _plain(extra, "template variables")

    def render(msgs: list[dict[str, Any]], tool_list: list[dict[str, Any]] | None) -> str:
        try:
            return _with_deadline(lambda: compiled.render(
                messages=msgs,
                tools=tool_list,
                documents=None,
                add_generation_prompt=bool(add_generation_prompt),
                **variables,
            ), deadline_s)
        except TemplateDeadlineError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        except Exception as exc:  # the template is data: any failure in it is a template failure
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    if not tool_list:
        return render(msgs, None)
    if any("tools" in m for m in msgs):
        raise ChatTemplateError("tools given both as tools= and on a message; give them once")
    # Whether the template reads a top-level `tools` is found by rendering: jinja2's static analysis reports
    # GLM-4's `{% set tools = item['tools'] %}` inside an `if` as a read of the global.
    with_top_level = render(msgs, tool_list)
    try:
        without = render(msgs, None)
    except ChatTemplateError:  # needs its tools
        return with_top_level
    if with_top_level != without:
        return with_top_level
    return render([{"role": "system", "content": "", "tools": tool_list}, *msgs], None)
