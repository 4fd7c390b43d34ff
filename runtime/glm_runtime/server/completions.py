"""``POST /v1/completions`` (OpenAI's legacy endpoint): raw text or token-id prompts, no chat template."""

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
from glm_runtime.server.choices import Choice, finish_reason
from glm_runtime.server.context import ServerContext, failed, usage
from glm_runtime.server.errors import APIError, client_error, error_body
from glm_runtime.server.logprobs import TokenStrings, check_top, completion_logprobs, echo_text, generated
from glm_runtime.server.schemas import CompletionBody
from glm_runtime.server.streaming import DONE, event_stream, sse

#: OpenAI's default ``max_tokens`` for the legacy completions endpoint.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


async def completions(ctx: ServerContext, request: Request) -> Response:
    llm, settings = ctx.llm, ctx.settings
    body = await ctx.read_body(request, CompletionBody)
    ctx.check_common(body)
    if body.suffix is not None or (body.best_of or 1) > 1:
        raise APIError(400, "suffix and best_of are not supported by this server", code="unsupported_parameter")
    check_top(body.logprobs, "logprobs")
    strings = TokenStrings(llm.tokenizer)
    try:
        prompt = body.prompt
        if not prompt or (isinstance(prompt, list) and not isinstance(prompt[0], int) and not all(prompt)):
            raise APIError(400, "prompt is empty: give text, token ids, or a list of either", param="prompt")
        count = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
        ctx.check_sequences(count, body.n)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = llm.text_prompt_ids(None, prompt)
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            ids = llm.text_prompt_ids(None, prompt)
        else:
            ids = await anyio.to_thread.run_sync(lambda: llm.text_prompt_ids(prompt, None))
        n_default = COMPLETIONS_DEFAULT_MAX_TOKENS
        specs = [llm.request_spec(p, ctx.max_new(body.max_tokens, p, n_default), body.temperature, body.top_p,
                                  body.top_k, body.repetition_penalty, body.seed, body.stop) for p in ids]
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        # echo + logprobs: the prompt's tokens scored too (as OpenAI's legacy API and vLLM: what
        # lm-evaluation-harness's loglikelihood requests rely on).
        choices = ctx.sequences(specs, body.n, loop, queue, body.ignore_eos, logprobs=body.logprobs,
                                prompt_logprobs=body.logprobs if body.echo else None)
    except (ValueError, QueueFullError, SchedulerClosedError) as e:
        raise client_error(e, prompt_param="prompt") from None
    rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name}
    ids_only = llm.tokenizer is None
    lengths = [len(s.prompt_ids) for s in specs]
    texts = prompt if isinstance(prompt, list) and not isinstance(prompt[0], int) else [prompt]
    echoes = [echo_text(llm, t, s.prompt_ids) if body.echo else "" for t, s in zip(texts, specs, strict=False)]

    def echo_of(c: Choice) -> str:
        return echoes[c.index // body.n]

    def logprobs_of(c: Choice, upto: int | None = None, prompt_part: bool = False) -> dict[str, Any] | None:
        """Legacy-format logprobs: the echoed prompt's tokens (the first without a value), or the choice's
        generated tokens not sent yet (up to ``upto``), offsets counted from the text sent before them."""
        if body.logprobs is None:
            return None
        if prompt_part:
            return completion_logprobs([c.seq.prompt[0], *c.seq.prompt_logprob_values], strings)
        offset = len(echo_of(c)) + sum(len(p) for p in c.parts[:-1])
        return completion_logprobs(generated(c, upto), strings, offset)

    def whole_logprobs(c: Choice) -> dict[str, Any] | None:
        if body.logprobs is None:
            return None
        gen = completion_logprobs(generated(c), strings, len(echo_of(c)))
        if not body.echo:
            return gen
        head = logprobs_of(c, prompt_part=True)
        assert head is not None
        return {k: head[k] + gen[k] for k in gen}

    if not body.stream:
        async for item in ctx.events(request, queue, choices, poll_disconnect=True):
            choices[item[1]].parts.append(item[2])
        if not all(c.done for c in choices):
            return Response(status_code=499)
        if (err := failed(choices)) is not None:
            raise err
        out = []
        for c in choices:
            lp = whole_logprobs(c)
            entry = {"index": c.index, "text": echo_of(c) + "".join(c.parts), "finish_reason": finish_reason(c.seq),
                     "logprobs": lp}
            if ids_only:  # no tokenizer: the ids are the answer (an extension field)
                entry["token_ids"] = list(c.seq.output)
            out.append(entry)
        return JSONResponse({**head, "choices": out, "usage": usage(lengths, choices)})

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def stream() -> AsyncIterator[str]:
        def chunk(index: int, text: str, reason: str | None, token: int | None,
                  lp: dict[str, Any] | None = None) -> str:
            entry: dict[str, Any] = {"index": index, "text": text, "finish_reason": reason, "logprobs": lp}
            if ids_only and token is not None:
                entry["token_ids"] = [token]
            return sse({**head, "choices": [entry]})

        echoed = [False] * len(choices)
        async for item in ctx.events(request, queue, choices, poll_disconnect=False):
            kind, index, text = item[0], item[1], item[2]
            c = choices[index]
            if body.echo and not echoed[index]:  # the prompt first (its logprobs exist once the first token does)
                echoed[index] = True
                yield chunk(index, echo_of(c), None, None, logprobs_of(c, prompt_part=True))
            c.parts.append(text)
            if kind == "token":
                c.seen += 1
                if text or ids_only:
                    yield chunk(index, text, None, item[3], logprobs_of(c, c.seen))
            elif choices[index].seq.finish_reason == "error":
                yield sse(error_body(f"generation failed: {choices[index].seq.error}", "server_error"))
            else:
                yield chunk(index, text, finish_reason(c.seq), None, logprobs_of(c))
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(lengths, choices)})
        yield DONE

    return event_stream(stream())
