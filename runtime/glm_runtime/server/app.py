"""The app factory: routes bound to one :class:`~glm_runtime.server.context.ServerContext`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from glm_runtime.api import LLM
from glm_runtime.scheduler import Scheduler
from glm_runtime.server.chat import chat_completions as chat_endpoint
from glm_runtime.server.completions import completions as completions_endpoint
from glm_runtime.server.context import ServerContext, ServerSettings
from glm_runtime.server.errors import install_error_handlers
from glm_runtime.server.limits import RequestSlots
from glm_runtime.server.metrics import MetricsMiddleware, prometheus_text
from glm_runtime.server.openapi import install_openapi
from glm_runtime.server.tokenize import install_tokenize_routes


def create_app(llm: LLM, scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``llm`` through ``scheduler`` (the caller owns both and closes the scheduler)."""
    app = FastAPI(title="glm-runtime", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    ctx = ServerContext(llm, scheduler, settings)
    install_error_handlers(app)
    install_openapi(app, settings.model_name, with_key=bool(settings.api_key))

    @app.get("/health")
    async def health() -> JSONResponse:
        snap = scheduler.snapshot()
        ok = snap["alive"]
        return JSONResponse({"status": "ok" if ok else "engine stopped", "running": snap["running"],
                             "queued": snap["queued"]}, 200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        ctx.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": ctx.started, "owned_by": "glm-runtime",
             "max_model_len": scheduler.max_cache_len}]})

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        ctx.authorize(request)
        return PlainTextResponse(prometheus_text(scheduler, ctx.counters), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat_endpoint(ctx, request)

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        return await completions_endpoint(ctx, request)

    install_tokenize_routes(app, ctx)
    app.add_middleware(MetricsMiddleware, counters=ctx.counters)
    slots = settings.limits.request_slots(scheduler.max_concurrency, scheduler.max_queue)
    app.add_middleware(RequestSlots, limit=slots)  # outermost: a refused request costs no body read
    return app
