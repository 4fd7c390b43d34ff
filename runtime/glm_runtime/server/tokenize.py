"""``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's shapes, at the server root as vLLM
has them): clients that count or score tokens (lm-evaluation-harness's ``local-completions`` with its remote
tokenizer, context-window planners) get exactly the ids this server's prompts are made of."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from glm_runtime.server.context import ServerContext
from glm_runtime.server.errors import APIError, client_error
from glm_runtime.server.schemas import ChatMessage

#: Ids one /detokenize request may carry (the body bound limits it too; this keeps the error clear).
MAX_DETOKENIZE_IDS = 1 << 20


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_IDS)


def install_tokenize_routes(app: FastAPI, ctx: ServerContext) -> None:
    llm = ctx.llm

    def tokenizer() -> Any:
        if llm.tokenizer is None:
            raise APIError(400, "this artifact has no tokenizer: it serves token ids only", code="tokenizer_missing")
        return llm.tokenizer

    async def body_of(request: Request, model: type[BaseModel]) -> Any:
        # read_body checks the key, the size bound and the model name; here a model name is optional.
        ctx.authorize(request)
        raw = await ctx.read_bytes(request)  # bounded in size and time, like the generation endpoints' bodies
        try:
            body = model.model_validate_json(raw or b"{}")
        except ValueError as e:
            raise APIError(400, f"invalid body: {str(e).splitlines()[0:3]}", code="invalid_value") from None
        name = getattr(body, "model", None)
        if name is not None and name != ctx.settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {ctx.settings.model_name!r}",
                           param="model", code="model_not_found")
        return body

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body: TokenizeBody = await body_of(request, TokenizeBody)
        tok = tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt (text) or messages (chat)", param="prompt")
        try:
            if body.messages is not None:  # the chat template, exactly as /v1/chat/completions renders it
                messages = [m.model_dump(exclude_unset=True) for m in body.messages]
                ids = await anyio.to_thread.run_sync(lambda: ctx.chat_prompt(messages, body.tools, None))
            elif body.add_special_tokens:  # as /v1/completions reads a text prompt ([gMASK]<sop> first)
                ids = llm.text_prompt_ids(body.prompt, None)[0]
            else:
                ids = tok.encode(body.prompt)
        except ValueError as e:
            raise client_error(e) from None
        out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.scheduler.max_cache_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [tok.decode([i]) for i in ids]
        return JSONResponse(out)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body: DetokenizeBody = await body_of(request, DetokenizeBody)
        tok = tokenizer()
        bad = [t for t in body.tokens if not 0 <= t < llm.config.vocab_size]
        if bad:
            raise APIError(400, f"token ids outside the vocabulary [0, {llm.config.vocab_size}): {bad[:5]}",
                           param="tokens")
        return JSONResponse({"prompt": tok.decode(body.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        ctx.authorize(request)
        tok = tokenizer()
        cfg = tok.config

        def token(name: str) -> str | None:
            value = cfg.get(name)
            return value.get("content") if isinstance(value, dict) else value

        eos = token("eos_token")
        if eos is None:  # GLM-4's answers end with <|user|> / <|observation|> / <|endoftext|>
            names = {v: k for k, v in tok.special_ids.items()}
            eos = next((names[i] for i in llm.default_stop_ids() if i in names), None)
        return JSONResponse({"tokenizer_class": "GLMTokenizer", "eos_token": eos, "bos_token": token("bos_token"),
                             "pad_token": token("pad_token"), "chat_template": tok.chat_template,
                             "model_max_length": ctx.scheduler.max_cache_len, "vocab_size": tok.vocab_size})
