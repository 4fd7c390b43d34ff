"""``response_format`` (json_object, json_schema) and ``tool_choice`` required / named as grammars for
constrained decoding (:mod:`glm_runtime.grammar`): which grammar a chat request needs, compiled off the event
loop, one :class:`~glm_runtime.grammar.Constraint` per choice."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from glm_runtime.api import LLM
from glm_runtime.grammar import Constraint, GrammarCompiler, GrammarError, chat_json_grammar, tool_call_grammar
from glm_runtime.server.errors import APIError


@functools.cache
def compiler(llm: LLM) -> GrammarCompiler:
    """One per model: llguidance's tokenizer view is built once (about a second for GLM-4's vocabulary)."""
    if llm.tokenizer is None:
        raise APIError(400, "structured output needs a tokenizer, and this artifact has none", code="tokenizer_missing")
    return GrammarCompiler(llm.tokenizer, llm.config.vocab_size, llm.default_stop_ids())


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar ``response_format`` asks for (``None``: plain text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return chat_json_grammar(None)
    if kind == "json_schema":
        spec = response_format.get("json_schema") if response_format else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        return chat_json_grammar(schema)
    raise APIError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format")


def tool_grammar(tools: list[dict[str, Any]] | None, tool_choice: Any, forced: str | None) -> str | None:
    """A grammar for a call that must happen (``required``, or a named tool: its arguments must parse against
    its ``parameters`` schema); ``None`` when the model may answer freely."""
    if not tools or not (forced or tool_choice == "required"):
        return None
    params = {t["function"]["name"]: t["function"].get("parameters") for t in tools
              if t.get("type") == "function" and isinstance(t.get("function"), dict)}
    if not params:
        return None
    return tool_call_grammar(params, forced)


def constraints(llm: LLM, grammar: str, n: int) -> Callable[[], Constraint]:
    """``n`` fresh constraints (one per choice), handed out one per call. Run it in a worker thread (the first
    request builds llguidance's tokenizer view); raises :class:`APIError` 400 for a schema llguidance cannot
    compile, before anything is submitted."""
    comp = compiler(llm)
    try:
        made = iter([comp.constraint(grammar) for _ in range(n)])
    except GrammarError as e:
        raise APIError(400, str(e), param="response_format", code="invalid_schema") from None
    return lambda: next(made)
