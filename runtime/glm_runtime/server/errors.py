"""OpenAI-style errors: one exception type raised anywhere, rendered by one handler as
``{"error": {message, type, param, code}}``; the runtime's refusals mapped onto HTTP statuses."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm_runtime.api import TokenizerMissingError
from glm_runtime.generator import TRUNCATE_HINT, ContextLengthError
from glm_runtime.scheduler import QueueFullError, SchedulerClosedError

log = logging.getLogger("glm_runtime.server")


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


def client_error(e: Exception, prompt_param: str = "messages") -> APIError:
    """The runtime's refusals (``ValueError`` with a message that says what to do) as 4xx responses.

    ``prompt_param``: the field a context-length error is about (``messages``, or ``prompt`` on
    ``/v1/completions``)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(e, SchedulerClosedError):
        return APIError(503, str(e), "server_error", code="service_unavailable")
    if isinstance(e, ContextLengthError):  # without the truncate advice: the HTTP API has no such option
        return APIError(400, str(e).replace(TRUNCATE_HINT, ""), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, TokenizerMissingError):
        return APIError(400, str(e), code="tokenizer_missing")
    return APIError(400, str(e))


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error body: ours, starlette's 404/405, and (as a 500) any bug."""

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
