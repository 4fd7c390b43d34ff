"""OpenAI-style errors from Serve's HTTP proxy when a replica fails under a request.

Why: when a replica dies (its actor is killed, its node is lost) while it handles a request, Serve's proxy answers
with a bare 500 and an empty or plain-text body if nothing was sent yet, and cuts a stream that had started. The
``openai`` client then reports a connection error or an unparseable 500. This middleware runs in the proxy
(Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook, :func:`middlewares`) and turns both into what our
server says for any failure: ``{"error": {message, type: "server_error", code: "replica_failed"}}`` with status
503 and ``Retry-After`` before the response started, and a last ``data: {"error": ...}`` event (which the
``openai`` client raises as an ``APIError``) followed by a proper end of a stream that had started. Serve's own
plain-text 5xx answers (timeouts, overload) get the OpenAI body too. Responses from our app pass untouched.

``glm-runtime serve --ray`` sets the variable before it starts Ray (every process of the local cluster inherits
it); on a cluster started elsewhere set it in the nodes' environment (``docs/deploy/rayservice.yaml``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("glm_runtime.ray_proxy")

#: The value for ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``.
CALLBACK = "glm_runtime.ray_proxy.middlewares"

REPLICA_FAILED = ("the replica serving this request failed before it finished (Serve is replacing it); "
                  "retry the request")


def error_json(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()


class OpenAIErrors:
    """Pure-ASGI middleware: see the module docstring."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "ended": False, "sse": False, "rewrite": None}
        held: list[dict[str, Any]] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                ctype = headers.get(b"content-type", b"")
                state["sse"] = ctype.startswith(b"text/event-stream")
                if message["status"] >= 500 and not ctype.startswith(b"application/json"):
                    state["rewrite"] = message["status"]  # Serve's own error text: hold it, answer JSON
                    held.append(message)
                    return
                state["started"] = True
            elif message["type"] == "http.response.body":
                if state["rewrite"] is not None:
                    held.append(message)
                    if not message.get("more_body", False):
                        text = b"".join(m.get("body", b"") for m in held[1:]).decode(errors="replace").strip()
                        await self._json(send, state["rewrite"], text or REPLICA_FAILED,
                                         "replica_failed" if not text else "server_error")
                        state["started"] = state["ended"] = True
                    return
                if not message.get("more_body", False):
                    state["ended"] = True
            await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, watch)
        except Exception as e:  # the proxy's call into the replica failed
            failure = e
        if state["ended"]:
            return
        log.warning("request %s ended without a complete response (%s): answering with an error", scope.get("path"),
                    type(failure).__name__ if failure else "no final body")
        if not state["started"]:
            await self._json(send, 503, REPLICA_FAILED, "replica_failed")
        elif state["sse"]:
            event = b"data: " + error_json(REPLICA_FAILED, "replica_failed") + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _json(send: Any, status: int, message: str, code: str) -> None:
        body = error_json(message, code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status in (503, 429):
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def middlewares() -> list[Any]:
    """Serve's HTTP proxy callback: the middlewares it wraps its ASGI app in."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrors)]
