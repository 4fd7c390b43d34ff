"""What every request shares: the settings, the API key check, body parsing and validation, submitting one
scheduler sequence per choice, and reading the choices' events until they finish (cancelling them if the
client leaves)."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from glm_runtime.api import LLM, RequestSpec
from glm_runtime.generator import ContextLengthError
from glm_runtime.scheduler import Scheduler, Sequence
from glm_runtime.server.choices import Choice, Relay
from glm_runtime.server.errors import APIError
from glm_runtime.server.limits import BodyTimeoutError, Limits, read_deadline
from glm_runtime.server.metrics import Counters
from glm_runtime.server.schemas import Body
from glm_runtime.tool_calls import tool_names

log = logging.getLogger("glm_runtime.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_LIMIT = 4096
#: How often a request waiting for a whole answer checks that its client is still connected.
DISCONNECT_POLL_S = 0.25

B = TypeVar("B", bound=Body)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    #: Sequences one request may ask for (prompts x n).
    max_sequences_per_request: int = 8
    #: Deadlines and connection bounds (:mod:`glm_runtime.server.limits`).
    limits: Limits = field(default_factory=Limits)


@dataclass
class ServerContext:
    """The model, the scheduler and the settings one app serves, with the steps every endpoint takes."""

    llm: LLM
    scheduler: Scheduler
    settings: ServerSettings
    counters: Counters = field(default_factory=Counters)
    started: int = field(default_factory=lambda: int(time.time()))

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):  # constant time: no timing oracle
            raise APIError(401, "incorrect API key", "authentication_error", code="invalid_api_key")

    async def read_body(self, request: Request, model: type[B]) -> B:
        """The authorized, size-bounded, type-checked body of a request for this server's model."""
        self.authorize(request)
        raw = await self.read_bytes(request)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # ValueError: also Python's 4300-digit integer limit
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        return self._validated(data, model)

    async def read_bytes(self, request: Request) -> bytes:
        """The raw body, bounded in size (413) and time (408); a client leaving mid-body is a quiet 499."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"request body over {limit} bytes (the server's --max-body-bytes)",
                           code="request_too_large")
        chunks, size = [], 0
        try:
            async with read_deadline(self.settings.limits.body_timeout):  # a slow body must not hold a slot
                async for chunk in request.stream():  # also bounds bodies sent without a content-length
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"request body over {limit} bytes (the server's --max-body-bytes)",
                                       code="request_too_large")
                    chunks.append(chunk)
        except BodyTimeoutError as e:
            raise APIError(408, f"{e}: send the body promptly", code="request_timeout") from None
        except ClientDisconnect:  # the client left mid-body: routine, not an error worth a traceback
            log.debug("client disconnected while sending the body of %s", request.url.path)
            raise APIError(499, "the client disconnected while sending the body", code="client_closed") from None
        return b"".join(chunks)

    def _validated(self, data: Any, model: type[B]) -> B:
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
        name = self.settings.model_name
        if body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves "
                                f"{name!r} (GET /v1/models)", param="model", code="model_not_found")
        return body

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    forced: str | None) -> list[int]:
        try:
            return self.llm.chat_prompt(messages, tools, f"{forced}\n" if forced else None)
        except (TypeError, AttributeError, KeyError) as e:  # a shape the validation above let through
            log.info("malformed messages or tools: %r", e)
            raise APIError(400, f"malformed messages or tools ({type(e).__name__}: {e}); see the OpenAI chat "
                                f"format", param="messages") from None

    def check_common(self, body: Body) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported; use repetition_penalty (transformers-style, "
                                    f"1 = off)", param=name, code="unsupported_parameter")
        limit = self.settings.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise APIError(400, f"max_tokens {body.max_tokens} is over this server's limit of {limit}",
                           param="max_tokens", code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop")

    def max_new(self, requested: int | None, prompt: list[int], default: int | None) -> int:
        if requested is not None:
            return requested
        room = self.scheduler.max_cache_len - len(prompt)
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this server's context is {self.scheduler.max_cache_len} "
                f"tokens per sequence: shorten the prompt")
        gen_default = default if default is not None else self.llm.default_max_new_tokens()
        return max(1, min(gen_default, self.settings.max_tokens_limit, room))

    def check_sequences(self, prompts: int, n: int) -> None:
        limit = self.settings.max_sequences_per_request
        if prompts * n > limit:  # before building anything: n may be 10**30
            raise APIError(400, f"{prompts} prompt(s) x n={n} sequences in one request; this server allows "
                                f"{limit}", param="n")

    def sequences(self, specs: list[RequestSpec], n: int, loop: asyncio.AbstractEventLoop,
                  queue: asyncio.Queue[Any], ignore_eos: bool, tools: list[dict[str, Any]] | None = None,
                  forced: str | None = None, logprobs: int | None = None,
                  prompt_logprobs: int | None = None, constraint: Callable[[], Any] | None = None) -> list[Choice]:
        """One scheduler sequence per prompt x n, submitted together (all or none)."""
        self.check_sequences(len(specs), n)
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
                text = self.llm.row_text(spec, tool_set)
                if forced and text is not None and text.assistant is not None:
                    text.assistant.mode = "tool"  # the metadata line naming the tool is already in the prompt
                relay = Relay(loop, queue, index, text)
                stop_ids = frozenset() if ignore_eos else frozenset(spec.stop_ids)
                seq = Sequence(spec.prompt_ids, spec.max_new_tokens, params, stop_ids, relay, logprobs=logprobs,
                               prompt_logprobs=prompt_logprobs,
                               constraint=constraint() if constraint is not None else None)
                choices.append(Choice(index, seq, relay, tools=tools, forced=forced))
        self.scheduler.submit(*(c.seq for c in choices))
        return choices

    async def events(self, request: Request, queue: asyncio.Queue[Any], choices: list[Choice],
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
                    self.scheduler.cancel(c.seq)


def usage(prompt_lengths: list[int], choices: list[Choice]) -> dict[str, int]:
    prompt = sum(prompt_lengths)
    completion = sum(len(c.seq.output) for c in choices)
    # As OpenAI and vLLM: prompt tokens whose K/V were reused (prefix cache, or the first sibling of n > 1).
    cached = sum(c.seq.cached for c in choices if not c.seq.shared)  # n > 1: the prompt counts once
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def failed(choices: list[Choice]) -> APIError | None:
    bad = [c.seq for c in choices if c.seq.finish_reason == "error"]
    if bad:
        return APIError(500, f"generation failed: {bad[0].error}", "server_error")
    return None
