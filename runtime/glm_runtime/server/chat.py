"""``POST /v1/chat/completions``: messages through GLM-4's chat template, whole or streamed answers, tool calls."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from glm_runtime.scheduler import QueueFullError, SchedulerClosedError
from glm_runtime.server.choices import chat_result, resolve_tool_choice
from glm_runtime.server.context import ServerContext, failed, usage
from glm_runtime.server.errors import APIError, client_error, error_body
from glm_runtime.server.logprobs import TokenStrings, chat_entries, check_top, generated
from glm_runtime.server.schemas import ChatBody
from glm_runtime.server.streaming import DONE, event_stream, sse
from glm_runtime.server.structured import constraints, response_format_grammar, tool_grammar


async def chat_completions(ctx: ServerContext, request: Request) -> Response:
    llm, settings = ctx.llm, ctx.settings
    body = await ctx.read_body(request, ChatBody)
    ctx.check_common(body)
    check_top(body.top_logprobs, "top_logprobs")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    strings = TokenStrings(llm.tokenizer)
    json_grammar = response_format_grammar(body.response_format)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_completion_tokens {max_tokens} is over this server's limit of "
                            f"{settings.max_tokens_limit}", param="max_completion_tokens")
    try:
        tools, forced = resolve_tool_choice(body.tools, body.tool_choice)
        grammar = tool_grammar(tools, body.tool_choice, forced) or json_grammar
        # Constrained decoding: compiled in a worker thread (the first request builds llguidance's tokenizer).
        make = await anyio.to_thread.run_sync(lambda: constraints(llm, grammar, body.n)) if grammar else None
        messages = [m.model_dump(exclude_unset=True) for m in body.messages]
        prompt = await anyio.to_thread.run_sync(lambda: ctx.chat_prompt(messages, tools, forced))
        spec = llm.request_spec(prompt, ctx.max_new(max_tokens, prompt, None), body.temperature, body.top_p,
                                body.top_k, body.repetition_penalty, body.seed, body.stop)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        choices = ctx.sequences([spec], body.n, loop, queue, body.ignore_eos, tools, forced, logprobs,
                                constraint=make)
    except (ValueError, QueueFullError, SchedulerClosedError) as e:
        raise client_error(e) from None
    rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    head = {"id": rid, "created": created, "model": settings.model_name}
    if not body.stream:
        async for item in ctx.events(request, queue, choices, poll_disconnect=True):
            choices[item[1]].parts.append(item[2])
        if not all(c.done for c in choices):
            return Response(status_code=499)  # the client left; nobody reads this
        if (err := failed(choices)) is not None:
            raise err
        out = []
        for c in choices:
            message, reason = chat_result(llm, c)
            lp = {"content": chat_entries(generated(c), strings)} if logprobs is not None else None
            out.append({"index": c.index, "message": message, "finish_reason": reason, "logprobs": lp})
        return JSONResponse({**head, "object": "chat.completion", "choices": out,
                             "usage": usage([len(spec.prompt_ids)], choices), "system_fingerprint": None})

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def stream() -> AsyncIterator[str]:
        def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> str:
            lp = None
            if logprobs is not None and "content" in delta:  # the tokens behind this text (and any held back)
                lp = {"content": chat_entries(generated(choices[index], choices[index].seen), strings)}
            return sse({**head, "object": "chat.completion.chunk", "system_fingerprint": None,
                        "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": lp}]})

        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for item in ctx.events(request, queue, choices, poll_disconnect=False):
            kind, index, text = item[0], item[1], item[2]
            c = choices[index]
            c.parts.append(text)
            if kind == "token":
                c.seen += 1
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
                elif logprobs is not None and c.sent < len(c.seq.output_logprobs):  # held-back tokens' logprobs
                    yield chunk(index, {"content": ""})
                yield chunk(index, {}, reason)
        if include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                       "usage": usage([len(spec.prompt_ids)], choices), "system_fingerprint": None})
        yield DONE

    return event_stream(stream())
