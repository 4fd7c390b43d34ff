"""ray_proxy.OpenAIErrors on stand-in ASGI apps (what Serve's proxy does when a replica fails), no Ray needed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from glm_runtime.ray_proxy import OpenAIErrors, middlewares


def call(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(OpenAIErrors(app)({"type": "http", "path": "/v1/chat/completions"}, receive, send))
    return sent


def start(status: int, ctype: bytes) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]}


def body(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_failure_before_the_response_is_a_503_error_body() -> None:
    async def dies(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("ActorDiedError")

    async def says_nothing(scope: Any, receive: Any, send: Any) -> None:
        return

    for app in (dies, says_nothing):
        sent = call(app)
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        err = json.loads(body(sent))["error"]
        assert err["type"] == "server_error" and err["code"] == "replica_failed" and "retry" in err["message"]
        assert sent[-1]["more_body"] is False


def test_a_cut_stream_ends_with_an_error_event() -> None:
    async def cut(scope: Any, receive: Any, send: Any) -> None:
        await send(start(200, b"text/event-stream"))
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        raise RuntimeError("RayActorError")

    sent = call(cut)
    assert sent[0]["status"] == 200 and sent[-1]["more_body"] is False
    events = [e for e in body(sent).decode().split("\n\n") if e]
    assert events[0] == 'data: {"choices": []}'
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "replica_failed"


def test_serves_plain_text_errors_become_openai_bodies_and_ours_pass() -> None:
    async def serve_500(scope: Any, receive: Any, send: Any) -> None:
        await send(start(500, b"text/plain; charset=utf-8"))
        await send({"type": "http.response.body", "body": b"Request timed out", "more_body": False})

    sent = call(serve_500)
    assert sent[0]["status"] == 500 and json.loads(body(sent))["error"]["message"] == "Request timed out"

    ours = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}

    async def app_400(scope: Any, receive: Any, send: Any) -> None:
        await send(start(400, b"application/json"))
        await send({"type": "http.response.body", "body": json.dumps(ours).encode(), "more_body": False})

    sent = call(app_400)
    assert sent[0]["status"] == 400 and json.loads(body(sent)) == ours and len(sent) == 2
    assert [m.cls for m in middlewares()] == [OpenAIErrors]
