"""OpenAI-compatible HTTP server: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``,
``/metrics``, on top of the continuous-batching :class:`~glm_runtime.scheduler.Scheduler`.

Why this shape:
- Existing clients (the ``openai`` package, curl, LangChain, ...) speak OpenAI's wire format, so requests,
  responses, server-sent-event chunks and error bodies follow it (``{"error": {message, type, param, code}}``).
  Parameters OpenAI has and GLM-4 cannot honour (``logprobs``, penalties other than 0, JSON mode) are refused
  with a 400 that says so instead of being silently ignored. ``top_k``, ``repetition_penalty`` and
  ``ignore_eos`` are accepted as extensions (as vLLM does).
- Everything about text is :mod:`glm_runtime.api`'s (prompt ids, defaults, stop strings, the GLM-4 answer
  format, tool-call parsing): this module only maps HTTP onto it, so the CLI, the Python API and the server
  give the same answers.
- Nothing blocks the event loop: the engine runs in the scheduler's thread and pushes each token to the
  request's asyncio queue (``call_soon_threadsafe``); the chat template renders in a worker thread.
- Safety: loopback by default, optional bearer key compared in constant time, request bodies, ``max_tokens``,
  prompts per request and open connections are bounded, and a full server answers 429 rather than queueing
  without end. The chat template is data rendered in jinja2's sandbox; no code from an artifact ever runs.

fastapi, pydantic and uvicorn are the ``server`` extra (``pip install 'glm-runtime[server]'``); the rest of the
runtime does not import this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm_runtime.api import LLM, RequestSpec, RowText, TokenizerMissingError
from glm_runtime.generator import ContextLengthError
from glm_runtime.scheduler import QueueFullError, Scheduler, SchedulerClosedError, Sequence
from glm_runtime.tool_calls import tool_names

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_LIMIT = 4096
#: How often a request waiting for a whole answer checks that its client is still connected.
DISCONNECT_POLL_S = 0.25
#: OpenAI's default ``max_tokens`` for the legacy completions endpoint.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# ---- errors -----------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields; raised anywhere, rendered by one handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _client_error(e: Exception) -> APIError:
    """The runtime's refusals (``ValueError`` with a message that says what to do) as 4xx responses."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(e, SchedulerClosedError):
        return APIError(503, str(e), "server_error", code="service_unavailable")
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, TokenizerMissingError):
        return APIError(400, str(e), code="tokenizer_missing")
    return APIError(400, str(e))


# ---- request bodies (pydantic: wrong types are 400s with the field named) ---------------------------------
class _Body(BaseModel):
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


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


# ---- settings and state -----------------------------------------------------------------------------------
@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    #: Sequences one request may ask for (prompts x n).
    max_sequences_per_request: int = 8


@dataclass
class Counters:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)


# ---- engine thread -> event loop --------------------------------------------------------------------------
class _Relay:
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
class _Choice:
    """One choice of a response as it is built (the same for streamed and whole responses)."""

    index: int
    seq: Sequence
    relay: _Relay
    parts: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    forced: str | None = None  # a tool name put on the answer's metadata line by tool_choice
    done: bool = False


def chat_result(llm: LLM, choice: _Choice) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason of a finished chat choice (tool calls parsed from its ids)."""
    seq = choice.seq
    text = "".join(choice.parts)
    reason = _finish_reason(seq)
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


def _finish_reason(seq: Sequence) -> str:
    return {"stop": "stop", "length": "length"}.get(seq.finish_reason or "", seq.finish_reason or "stop")


# ---- the app ------------------------------------------------------------------------------------------------
class _Metrics:
    """Pure-ASGI middleware counting responses by path and status (no buffering of streamed bodies)."""

    def __init__(self, app: Any, counters: Counters) -> None:
        self.app, self.counters = app, counters

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        path = path if path in _ROUTES else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                key = (path, int(message["status"]))
                self.counters.requests[key] = self.counters.requests.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(llm: LLM, scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``llm`` through ``scheduler`` (the caller owns both and closes the scheduler)."""
    app = FastAPI(title="glm-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    counters = Counters()
    started = int(time.time())
    key = settings.api_key.encode() if settings.api_key else None

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}: the API is under /v1 (chat/completions, completions, models)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error"), exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # a bug, never a client's fault
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log", "server_error"),
                            500)

    def authorize(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key):  # constant time: no timing oracle on the key
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def read_body(request: Request, model: type[BaseModel]) -> Any:
        authorize(request)
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"request body over {limit} bytes (the server's --max-body-bytes)",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds bodies sent without a content-length
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body over {limit} bytes (the server's --max-body-bytes)",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            body = model.model_validate(data)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise APIError(400, f"{where}: {err['msg']} (got {json.dumps(err.get('input'))[:100]})",
                           param=where, code="invalid_type" if "type" in err["type"] else "invalid_value") from None
        if body.model != settings.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves "
                                f"{settings.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        return body

    def chat_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    forced: str | None) -> list[int]:
        try:
            return llm.chat_prompt(messages, tools, f"{forced}\n" if forced else None)
        except (TypeError, AttributeError, KeyError) as e:  # a shape the validation above let through
            log.info("malformed messages or tools: %r", e)
            raise APIError(400, f"malformed messages or tools ({type(e).__name__}: {e}); see the OpenAI chat "
                                f"format", param="messages") from None

    def check_common(body: _Body) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported; use repetition_penalty (transformers-style, "
                                    f"1 = off)", param=name, code="unsupported_parameter")
        if body.max_tokens is not None and body.max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens {body.max_tokens} is over this server's limit of "
                                f"{settings.max_tokens_limit}", param="max_tokens", code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop")

    def max_new(requested: int | None, prompt: list[int], default: int | None) -> int:
        if requested is not None:
            return requested
        room = scheduler.max_cache_len - len(prompt)
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this server's context is {scheduler.max_cache_len} tokens "
                f"per sequence: shorten the prompt")
        gen_default = default if default is not None else llm.default_max_new_tokens()
        return max(1, min(gen_default, settings.max_tokens_limit, room))

    def sequences(specs: list[RequestSpec], n: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any],
                  ignore_eos: bool, tools: list[dict[str, Any]] | None = None,
                  forced: str | None = None) -> list[_Choice]:
        """One scheduler sequence per prompt x n, submitted together (all or none)."""
        if len(specs) * n > settings.max_sequences_per_request:  # before building anything: n may be 10**30
            raise APIError(400, f"{len(specs)} prompt(s) x n={n} sequences in one request; this server allows "
                                f"{settings.max_sequences_per_request}", param="n")
        tool_set = None
        if tools:
            functions, builtins = tool_names(tools)
            tool_set = functions | builtins
        choices = []
        for spec in specs:
            for j in range(n):
                index = len(choices)
                params = spec.params
                if params.seed is not None and j:
                    params = dataclasses.replace(params, seed=params.seed + j)  # n different, reproducible
                text = llm.row_text(spec, tool_set)
                if forced and text is not None and text.assistant is not None:
                    text.assistant.mode = "tool"  # the metadata line naming the tool is already in the prompt
                relay = _Relay(loop, queue, index, text)
                stop_ids = frozenset() if ignore_eos else frozenset(spec.stop_ids)
                seq = Sequence(spec.prompt_ids, spec.max_new_tokens, params, stop_ids, relay)
                choices.append(_Choice(index, seq, relay, tools=tools, forced=forced))
        scheduler.submit(*(c.seq for c in choices))
        return choices

    async def events(request: Request, queue: asyncio.Queue[Any], choices: list[_Choice],
                     poll_disconnect: bool) -> AsyncIterator[tuple[Any, ...]]:
        """The choices' events until all have finished; the sequences are cancelled if we stop early."""
        pending = len(choices)
        checked = time.monotonic()
        try:
            while pending:
                if poll_disconnect:  # a whole-answer request: nothing is sent, so look for a gone client
                    if time.monotonic() - checked > DISCONNECT_POLL_S:
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            return
                    try:
                        item = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        continue
                else:  # streamed: starlette cancels this task when the client disconnects
                    item = await queue.get()
                if item[0] == "finish":
                    pending -= 1
                    choices[item[1]].done = True
                yield item
        finally:
            for c in choices:
                if not c.done:
                    scheduler.cancel(c.seq)

    def usage(prompt_lengths: list[int], choices: list[_Choice]) -> dict[str, int]:
        prompt = sum(prompt_lengths)
        completion = sum(len(c.seq.output) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def failed(choices: list[_Choice]) -> APIError | None:
        bad = [c.seq for c in choices if c.seq.finish_reason == "error"]
        if bad:
            return APIError(500, f"generation failed: {bad[0].error}", "server_error")
        return None

    def sse(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    # ---- routes -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        snap = scheduler.snapshot()
        ok = snap["alive"]
        return JSONResponse({"status": "ok" if ok else "engine stopped", "running": snap["running"],
                             "queued": snap["queued"]}, 200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": started, "owned_by": "glm-runtime",
             "max_model_len": scheduler.max_cache_len}]})

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        authorize(request)
        return PlainTextResponse(prometheus_text(scheduler, counters), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatBody = await read_body(request, ChatBody)
        check_common(body)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_parameter")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported (GLM-4 has no JSON mode "
                                "here); describe the format in the prompt", param="response_format")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_completion_tokens {max_tokens} is over this server's limit of "
                                f"{settings.max_tokens_limit}", param="max_completion_tokens")
        try:
            tools, forced = _tool_choice(body.tools, body.tool_choice)
            messages = [m.model_dump(exclude_unset=True) for m in body.messages]
            prompt = await anyio.to_thread.run_sync(lambda: chat_prompt(messages, tools, forced))
            spec = llm.request_spec(prompt, max_new(max_tokens, prompt, None), body.temperature, body.top_p,
                                    body.top_k, body.repetition_penalty, body.seed, body.stop)
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            choices = sequences([spec], body.n, loop, queue, body.ignore_eos, tools, forced)
        except (ValueError, QueueFullError, SchedulerClosedError) as e:
            raise _client_error(e) from None
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "created": created, "model": settings.model_name}
        if not body.stream:
            async for item in events(request, queue, choices, poll_disconnect=True):
                choices[item[1]].parts.append(item[2])
            if not all(c.done for c in choices):
                return Response(status_code=499)  # the client left; nobody reads this
            if (err := failed(choices)) is not None:
                raise err
            out = []
            for c in choices:
                message, reason = chat_result(llm, c)
                out.append({"index": c.index, "message": message, "finish_reason": reason, "logprobs": None})
            return JSONResponse({**head, "object": "chat.completion", "choices": out,
                                 "usage": usage([len(spec.prompt_ids)], choices), "system_fingerprint": None})

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream() -> AsyncIterator[str]:
            def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> str:
                return sse({**head, "object": "chat.completion.chunk", "system_fingerprint": None,
                            "choices": [{"index": index, "delta": delta, "finish_reason": reason,
                                         "logprobs": None}]})

            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": ""})
            async for item in events(request, queue, choices, poll_disconnect=False):
                kind, index, text = item[0], item[1], item[2]
                c = choices[index]
                c.parts.append(text)
                if text:
                    yield chunk(index, {"content": text})
                if kind == "finish":
                    if c.seq.finish_reason == "error":
                        yield sse(error_body(f"generation failed: {c.seq.error}", "server_error"))
                        continue
                    message, reason = chat_result(llm, c)
                    if reason == "tool_calls":
                        calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                        yield chunk(index, {"tool_calls": calls})
                    elif message["content"] != "".join(c.parts):  # an unusable tool call: its raw text
                        yield chunk(index, {"content": message["content"]})
                    yield chunk(index, {}, reason)
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage([len(spec.prompt_ids)], choices), "system_fingerprint": None})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionBody = await read_body(request, CompletionBody)
        check_common(body)
        if body.echo or body.logprobs is not None or body.suffix is not None or (body.best_of or 1) > 1:
            raise APIError(400, "echo, logprobs, suffix and best_of are not supported by this server",
                           code="unsupported_parameter")
        try:
            prompt = body.prompt
            if not prompt or (isinstance(prompt, list) and not all(prompt)):
                raise APIError(400, "prompt is empty: give text, token ids, or a list of either", param="prompt")
            count = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
            if count * body.n > settings.max_sequences_per_request:
                raise APIError(400, f"{count} prompt(s) x n={body.n} sequences in one request; this server allows "
                                    f"{settings.max_sequences_per_request}", param="n")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                ids = llm.text_prompt_ids(None, prompt)
            elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
                ids = llm.text_prompt_ids(None, prompt)
            else:
                ids = await anyio.to_thread.run_sync(lambda: llm.text_prompt_ids(prompt, None))
            n_default = COMPLETIONS_DEFAULT_MAX_TOKENS
            specs = [llm.request_spec(p, max_new(body.max_tokens, p, n_default), body.temperature, body.top_p,
                                      body.top_k, body.repetition_penalty, body.seed, body.stop) for p in ids]
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            choices = sequences(specs, body.n, loop, queue, body.ignore_eos)
        except (ValueError, QueueFullError, SchedulerClosedError) as e:
            raise _client_error(e) from None
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name}
        ids_only = llm.tokenizer is None
        lengths = [len(s.prompt_ids) for s in specs]
        if not body.stream:
            async for item in events(request, queue, choices, poll_disconnect=True):
                choices[item[1]].parts.append(item[2])
            if not all(c.done for c in choices):
                return Response(status_code=499)
            if (err := failed(choices)) is not None:
                raise err
            out = []
            for c in choices:
                entry = {"index": c.index, "text": "".join(c.parts), "finish_reason": _finish_reason(c.seq),
                         "logprobs": None}
                if ids_only:  # no tokenizer: the ids are the answer (an extension field)
                    entry["token_ids"] = list(c.seq.output)
                out.append(entry)
            return JSONResponse({**head, "choices": out, "usage": usage(lengths, choices)})

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream() -> AsyncIterator[str]:
            def chunk(index: int, text: str, reason: str | None, token: int | None) -> str:
                entry: dict[str, Any] = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
                if ids_only and token is not None:
                    entry["token_ids"] = [token]
                return sse({**head, "choices": [entry]})

            async for item in events(request, queue, choices, poll_disconnect=False):
                kind, index, text = item[0], item[1], item[2]
                if kind == "token":
                    if text or ids_only:
                        yield chunk(index, text, None, item[3])
                elif choices[index].seq.finish_reason == "error":
                    yield sse(error_body(f"generation failed: {choices[index].seq.error}", "server_error"))
                else:
                    yield chunk(index, text, _finish_reason(choices[index].seq), None)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(lengths, choices)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(_Metrics, counters=counters)
    return app


def _tool_choice(tools: list[dict[str, Any]] | None,
                 choice: str | dict[str, Any] | None) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(tools to offer, function name to force)``. GLM-4 has no constrained decoding, but its answer starts with
    a metadata line naming the tool: putting a name there forces a call to that tool (its arguments are still
    the model's)."""
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
        raise APIError(400, "tool_choice 'required' needs exactly one function tool here (GLM-4 cannot be "
                            "constrained to 'one of several'); name the function: {'type': 'function', "
                            "'function': {'name': ...}}", param="tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") == "function" and isinstance(name, str):
            if name not in functions:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
            return tools, name
    raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                        f"{{'name': ...}}}}, got {choice!r}", param="tool_choice")


def prometheus_text(scheduler: Scheduler, counters: Counters) -> str:
    """``/metrics`` in Prometheus' text exposition format (written by hand: no client library needed)."""
    st, snap = scheduler.stats, scheduler.snapshot()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                     for labels, value in samples)

    metric("glm_http_requests_total", "counter", "HTTP responses by path and status code.",
           [(f'{{path="{p}",code="{c}"}}', v) for (p, c), v in sorted(counters.requests.items())])
    metric("glm_sequences_running", "gauge", "Sequences in the decode batch or being prefilled.",
           [("", snap["running"])])
    metric("glm_sequences_queued", "gauge", "Sequences waiting for a row.", [("", snap["queued"])])
    metric("glm_sequences_max", "gauge", "Rows of the KV pool (--max-concurrency).", [("", snap["max_concurrency"])])
    metric("glm_sequences_submitted_total", "counter", "Sequences accepted.", [("", st.submitted)])
    metric("glm_sequences_rejected_total", "counter", "Sequences refused because the server was full (429).",
           [("", st.rejected)])
    metric("glm_sequences_finished_total", "counter", "Sequences ended, by reason.",
           [(f'{{reason="{r}"}}', v) for r, v in sorted(st.finished.items())])
    metric("glm_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", st.prompt_tokens)])
    metric("glm_generation_tokens_total", "counter", "Tokens generated.", [("", st.generated_tokens)])
    metric("glm_decode_steps_total", "counter", "Batched decode steps run.", [("", st.decode_steps)])
    metric("glm_decode_rows_total", "counter", "Sum of decode batch sizes (mean batch = rows / steps).",
           [("", st.decode_rows)])
    metric("glm_time_to_first_token_seconds", "summary", "Submit to first token.",
           [("_sum", float(st.ttft_seconds_sum)), ("_count", st.ttft_count)])
    metric("glm_queue_seconds_total", "counter", "Time sequences waited for a row.",
           [("", float(st.queue_seconds_sum))])
    metric("glm_kv_pool_bytes", "gauge", "Bytes of the KV pool now.", [("", snap["kv_bytes"])])
    metric("glm_kv_pool_slots", "gauge", "Cache length of the KV pool now.", [("", snap["cache_len"])])
    metric("glm_kv_pool_max_bytes", "gauge", "The pool's bound (KV + scratch + resize) checked at start.",
           [("", snap["kv_max_bytes"])])
    metric("glm_kv_budget_bytes", "gauge", "The KV budget.", [("", snap["kv_budget_bytes"])])
    metric("glm_engine_errors_total", "counter", "Engine steps that failed.", [("", st.engine_errors)])
    metric("glm_process_resident_memory_bytes", "gauge", "Resident set size of the server.", [("", _rss())])
    return "\n".join(lines) + "\n"


def _rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ---- running it -------------------------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def read_api_key(path: str | os.PathLike[str]) -> str:
    """The key from a file (not a command-line argument: those show up in ``ps``)."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror}") from None
    if len(key) < 8 or any(c.isspace() for c in key):
        raise ValueError(f"the API key in {path} must be one line of at least 8 non-blank characters")
    return key


def serve(llm: LLM, scheduler: Scheduler, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          shutdown_timeout: float = 30.0, max_connections: int | None = None,
          log_level: Literal["info", "warning", "error"] = "info") -> None:
    """Run the server in this (main) thread until SIGINT/SIGTERM, then shut down gracefully and return.

    On a signal: stop accepting, let in-flight requests finish for up to ``shutdown_timeout`` seconds, cancel
    what is left, stop the engine thread. Returns normally (exit code 0), unlike uvicorn's default of
    re-raising the signal.
    """
    import threading

    class GracefulServer(uvicorn.Server):
        draining: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a graceful stop is a normal exit, not death by signal
            if self.draining is None:
                log.info("signal %d: stopping (in-flight requests get up to %.0f s)", sig, shutdown_timeout)
                # At the deadline the scheduler ends what is still running ("cancelled"): each response then
                # closes properly (final chunk, [DONE]) before uvicorn's own, later, hard cancellation.
                self.draining = threading.Timer(shutdown_timeout, lambda: scheduler.close(timeout=0))
                self.draining.daemon = True
                self.draining.start()

    if host not in LOOPBACK and settings.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(--api-key-file)", host)
    app = create_app(llm, scheduler, settings)
    limit = max_connections or 2 * (scheduler.max_concurrency + scheduler.max_queue) + 16
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout + 5, limit_concurrency=limit)
    try:
        GracefulServer(config).run()
    finally:
        scheduler.close()
