"""``GET /openapi.json``: the OpenAPI document of this server, so schema-driven tools (schemathesis, client
generators) can use it (as vLLM serves its own).

Why written here rather than left to FastAPI: the generation endpoints parse their bodies themselves (size limit
before parsing, one OpenAI-style 400 for any bad field), so FastAPI sees no request models. The document is
therefore assembled from the same pydantic models the endpoints validate with (:mod:`.schemas`), plus the answers'
shapes and every status code the server can return, so "responses conform to the schema" and "status codes are
documented" are checkable properties (tests/test_server_schema.py runs schemathesis against it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from glm_runtime.server.schemas import ChatBody, CompletionBody
from glm_runtime.server.tokenize import DetokenizeBody, TokenizeBody

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer", "minimum": 0}
                        for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}

FINISH = {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", "cancelled", None]}

CHAT_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                   "properties": {
                       "id": {"type": "string"}, "object": {"const": "chat.completion"},
                       "created": {"type": "integer"}, "model": {"type": "string"}, "usage": USAGE,
                       "choices": {"type": "array", "items": {
                           "type": "object", "required": ["index", "message", "finish_reason"],
                           "properties": {"index": {"type": "integer"}, "finish_reason": FINISH,
                                          "message": {"type": "object", "required": ["role"],
                                                      "properties": {"role": {"const": "assistant"},
                                                                     "content": {"type": ["string", "null"]},
                                                                     "tool_calls": {"type": "array"}}}}}}}}

TEXT_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                   "properties": {
                       "id": {"type": "string"}, "object": {"const": "text_completion"},
                       "created": {"type": "integer"}, "model": {"type": "string"}, "usage": USAGE,
                       "choices": {"type": "array", "items": {
                           "type": "object", "required": ["index", "text", "finish_reason"],
                           "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                          "finish_reason": FINISH,
                                          "token_ids": {"type": "array", "items": {"type": "integer"}}}}}}}

MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"},
    "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"],
                                        "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                                       "max_model_len": {"type": "integer"}}}}}}

TOKENIZED = {"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
    "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
    "tokens": {"type": "array", "items": {"type": "integer"}},
    "token_strs": {"type": "array", "items": {"type": "string"}}}}

DETOKENIZED = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}

HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string"}, "running": {"type": "integer"}, "queued": {"type": "integer"}}}

#: Roles a chat message may have (glm_runtime.tool_calls.openai_to_glm_messages maps them onto GLM-4's).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "observation")

#: What each status means here (every one the server can send; a 5xx other than 503 would be a bug).
STATUSES = {"400": "Invalid request (OpenAI-style error body naming the field).",
            "401": "Missing or wrong API key.", "404": "Unknown model.", "408": "The body did not arrive in time.",
            "413": "Body over --max-body-bytes.", "429": "Server full: retry after Retry-After.",
            "499": "The client disconnected.", "503": "Too many requests in flight, or shutting down."}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: _json(ERROR, STATUSES[c]) for c in codes}


def _body_schema(model: type[Any], components: dict[str, Any], model_name: str) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    optional = "model" not in schema.get("required", [])
    schema["properties"]["model"] = {"type": ["string", "null"] if optional else "string",
                                     "enum": [model_name, None] if optional else [model_name],
                                     "description": "The served model (404 for any other)."}
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def openapi_document(title: str, version: str, model_name: str, with_key: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes :func:`~glm_runtime.server.app.create_app` serves."""
    components: dict[str, Any] = {}
    chat = _body_schema(ChatBody, components, model_name)
    completion = _body_schema(CompletionBody, components, model_name)
    tokenize = _body_schema(TokenizeBody, components, model_name)
    detokenize = _body_schema(DetokenizeBody, components, model_name)
    token_errors = _errors("400", "401", "404", "408", "413", "499", "503")
    components["ChatMessage"]["properties"]["role"] = {"type": "string", "enum": list(CHAT_ROLES)}
    # One server-sent event: "data: <a chunk as JSON, an error body, or [DONE]>" (schema tools check each event).
    sse = {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                            "properties": {"data": {"type": "string"},
                                                           "event": {"type": "string"}}}}}
    generation_errors = _errors("400", "401", "404", "408", "413", "429", "499", "503")

    def generation(summary: str, body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        return {"post": {"summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                         "responses": {"200": {"description": "The answer (JSON), or server-sent events with "
                                                              "stream=true.",
                                               "content": {"application/json": {"schema": answer}, **sse}},
                                       **generation_errors}}}

    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible API of glm-runtime (see docs/server.md)."},
        "paths": {
            "/v1/chat/completions": generation("Chat completion", chat, CHAT_COMPLETION),
            "/v1/completions": generation("Text completion (legacy)", completion, TEXT_COMPLETION),
            "/v1/models": {"get": {"summary": "The served model",
                                   "responses": {"200": _json(MODELS, "The model list."), **_errors("401", "503")}}},
            "/health": {"get": {"summary": "Liveness (no key needed, answered under any load)", "security": [],
                                "responses": {"200": _json(HEALTH, "Serving."),
                                              "503": _json(HEALTH, "The engine stopped.")}}},
            "/tokenize": {"post": {
                "summary": "Prompt ids as this server makes them (vLLM's shape)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": tokenize}}},
                "responses": {"200": _json(TOKENIZED, "The ids."), **token_errors}}},
            "/detokenize": {"post": {
                "summary": "Text of token ids",
                "requestBody": {"required": True, "content": {"application/json": {"schema": detokenize}}},
                "responses": {"200": _json(DETOKENIZED, "The text."), **token_errors}}},
            "/tokenizer_info": {"get": {"summary": "The tokenizer's special tokens and chat template",
                                        "responses": {"200": _json({"type": "object"}, "Tokenizer facts."),
                                                      **_errors("400", "401", "503")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Text exposition format.",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **_errors("401")}}},
        },
        "components": {"schemas": components},
    }
    if with_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def install_openapi(app: FastAPI, model_name: str, with_key: bool) -> None:
    """Serve :func:`openapi_document` as ``app.openapi()`` (FastAPI's ``/openapi.json`` route returns it)."""
    doc = openapi_document(app.title, app.version, model_name, with_key)
    app.openapi = lambda: doc  # type: ignore[method-assign]
