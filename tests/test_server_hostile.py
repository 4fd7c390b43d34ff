"""The server against slow, idle, flooding and odd clients (issue 19: D4, D1, D2, D3, D13), over raw sockets where
a client library would hide what is sent.

Each server here runs the protocol and deadlines ``glm-runtime serve`` runs (:mod:`glm_runtime.server.limits`),
with small limits so the tests take seconds.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from glm_runtime import LLM, load
from glm_runtime.scheduler import Scheduler
from glm_runtime.server import Limits, ServerSettings, create_app
from glm_runtime.server.limits import ConnectionTable, protocol_class

MODEL = "tiny"


@pytest.fixture(scope="module")
def llm(tiny_artifact: Path) -> LLM:
    return load(tiny_artifact, threads=1, verify="none")


@contextmanager
def guarded(llm: LLM, sndbuf: int | None = None, max_tokens: int = 64,
            **limits: float) -> Iterator[tuple[str, int, ConnectionTable]]:
    """A server with ``serve``'s protocol and the given limits; yields (base URL, port, connection table).
    ``sndbuf``: the kernel send buffer of its connections (accepted sockets inherit the listener's)."""
    sched = Scheduler(llm.engine, max_concurrency=2, max_queue=2, kv_budget_bytes=1 << 30)
    lim = Limits(**limits)
    app = create_app(llm, sched, ServerSettings(MODEL, max_tokens_limit=max_tokens, limits=lim))
    protocol, table = protocol_class(lim)
    sock = socket.socket()
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", http=protocol))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = sock.getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", port, table
    finally:
        server.should_exit = True
        thread.join(10)
        sched.close()


def connect(port: int, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``s`` (EOF or reset), or None if it stayed open that long."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while True:
            if not s.recv(4096):
                return time.monotonic() - t0
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - t0


def test_idle_sockets_do_not_deny_service(llm: LLM) -> None:
    """D4: twice the connection limit in silent sockets; /health and a real request are still answered (main
    answered 503 to everyone once ~96 such sockets were open)."""
    with guarded(llm, max_connections=20, head_timeout=30) as (base, port, table):
        idle = [connect(port) for _ in range(40)]
        time.sleep(0.3)
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.get("/health").status_code == 200
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert c.get("/health").status_code == 200  # the same (now keep-alive) connection
        assert table.shed >= 20
        assert len(table.open) <= 20
        for s in idle:
            s.close()


def test_shedding_spares_clients_that_completed_a_request(llm: LLM) -> None:
    """Past the limit, silent connections go before a keep-alive client's."""
    with guarded(llm, max_connections=5, head_timeout=30) as (base, port, _):
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/health").status_code == 200  # now an idle keep-alive connection
            floods = [connect(port) for _ in range(12)]
            time.sleep(0.3)
            assert c.get("/health").status_code == 200
            assert c.get("/health").status_code == 200
        for s in floods:
            s.close()


def test_head_and_keepalive_deadlines(llm: LLM) -> None:
    """A silent socket, half a request head, and a slowloris trickling header bytes are all closed at the head
    deadline (main kept a half-open request over 40 s)."""
    with guarded(llm, head_timeout=1.0) as (_, port, table):
        silent = connect(port)
        half = connect(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        drip = connect(port, b"GET /health HTTP/1.1\r\n")
        for _ in range(4):  # a byte every 0.4 s resets uvicorn's keep-alive timer, not the head deadline
            time.sleep(0.4)
            try:
                drip.sendall(b"X")
            except OSError:
                break
        for s in (silent, half, drip):
            took = closed_within(s, 5)
            assert took is not None and took < 3, took
            s.close()
        assert table.head_timeouts >= 3


def test_body_deadline_is_a_408(llm: LLM) -> None:
    with guarded(llm, body_timeout=1.0) as (_, port, _):
        s = connect(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\":")
        t0 = time.monotonic()
        s.settimeout(10)
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert 0.8 < time.monotonic() - t0 < 5
        s.close()


def test_a_client_that_stops_reading_is_disconnected(llm: LLM) -> None:
    """A stream nobody reads would hold its request slot (and its connection) for ever; the send deadline ends it
    and frees the slot."""
    with guarded(llm, sndbuf=4096, max_tokens=4000, send_timeout=1.0) as (base, port, table):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        body = b'{"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true, "stream": true}'
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60
        while table.send_timeouts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # never reading
        assert table.send_timeouts == 1
        with httpx.Client(base_url=base, timeout=10) as c:
            for _ in range(50):
                health = c.get("/health").json()
                if health["running"] == 0:
                    break
                time.sleep(0.1)
            assert health["running"] == 0  # the sequence was cancelled with its connection
        s.close()


def test_health_is_answered_when_request_slots_are_full(llm: LLM) -> None:
    with guarded(llm, max_requests=1, body_timeout=20) as (base, port, _):
        holder = connect(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        time.sleep(0.3)  # its request is in flight, reading a body that does not come
        with httpx.Client(base_url=base, timeout=10) as c:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 1})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "service_unavailable"
            assert c.get("/health").status_code == 200
            assert c.get("/metrics").status_code == 200
        holder.close()


def test_client_leaving_mid_body_logs_no_traceback(llm: LLM, caplog: pytest.LogCaptureFixture) -> None:
    """D13: 630 tracebacks after the tester's probes; a client that leaves is routine."""
    with guarded(llm) as (base, port, _), caplog.at_level(logging.INFO):
        for _ in range(5):
            s = connect(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"")
            time.sleep(0.05)
            s.close()
        time.sleep(0.3)
        assert httpx.get(base + "/health").status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "glm_runtime" in r.name], \
        [r.getMessage() for r in caplog.records]


def test_huge_integers_and_token_id_zero(llm: LLM) -> None:
    """D1: a 5000-digit seed is a 400, not a 500. D2: token id 0 is a valid prompt id."""
    from fastapi.testclient import TestClient

    sched = Scheduler(llm.engine, max_concurrency=2, kv_budget_bytes=1 << 30)
    app = create_app(llm, sched, ServerSettings(MODEL, max_tokens_limit=64))
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            body = '{"model": "tiny", "prompt": [1, 2], "max_tokens": 1, "seed": ' + "9" * 5000 + "}"
            r = c.post("/v1/completions", content=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
            for prompt in ([5, 0, 300], [0], [[0, 2], [3]]):
                r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
                assert r.status_code == 200, (prompt, r.text)
            for prompt in ([], [[]], [[1], []], ""):
                r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (prompt, r.text)
    finally:
        sched.close()


def test_tiny_temperature_is_near_greedy(llm: LLM) -> None:
    """D3: temperature 1e-300 gave one fixed garbage sequence (1/T overflowed); it must act like greedy."""
    from fastapi.testclient import TestClient

    sched = Scheduler(llm.engine, max_concurrency=2, kv_budget_bytes=1 << 30)
    app = create_app(llm, sched, ServerSettings(MODEL, max_tokens_limit=64))
    body = {"model": MODEL, "prompt": [11, 22, 33, 44], "max_tokens": 8, "ignore_eos": True}
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            greedy = c.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]
            for t, seed in ((1e-300, 1), (1e-300, 2), (5e-324, 3), (1e-40, 4)):
                got = c.post("/v1/completions", json={**body, "temperature": t, "seed": seed}).json()["choices"][0]
                assert got["text"] == greedy["text"], (t, got, greedy)
    finally:
        sched.close()


def test_refused_when_every_connection_is_busy() -> None:
    """The connection table alone: the newcomer is refused only when nothing idle can go."""

    class Conn:
        def __init__(self, idle: bool, served: int = 0) -> None:
            self._idle, self.served, self.closed = idle, served, False

        def idle(self) -> bool:
            return self._idle

        def close_idle(self) -> None:
            self.closed = True
            table.remove(self)  # type: ignore[arg-type]

    table = ConnectionTable(2)
    busy = [Conn(False), Conn(False)]
    for c in busy:
        assert table.admit(c)  # type: ignore[arg-type]
    assert not table.admit(Conn(True))  # type: ignore[arg-type]
    table = ConnectionTable(3)
    old_silent, keep_alive, newer_silent = Conn(True), Conn(True, served=2), Conn(True)
    for c in (old_silent, keep_alive, newer_silent):
        table.admit(c)  # type: ignore[arg-type]
    newcomer = Conn(True)
    assert table.admit(newcomer)  # type: ignore[arg-type]
    assert old_silent.closed and not keep_alive.closed and not newer_silent.closed


def test_serve_rejects_a_port_out_of_range(tiny_artifact: Path) -> None:
    """D9: `serve --port 99999` printed a traceback."""
    from typer.testing import CliRunner

    from glm_runtime.cli import app

    r = CliRunner().invoke(app, ["serve", str(tiny_artifact), "--port", "99999"])
    assert r.exit_code != 0 and "Traceback" not in r.output and "65535" in r.output, r.output


def test_context_errors_name_the_prompt_and_offer_no_truncate_option(llm: LLM) -> None:
    """The HTTP API has no `truncate`; /v1/completions' context errors named `messages`."""
    from fastapi.testclient import TestClient

    sched = Scheduler(llm.engine, max_concurrency=1, kv_budget_bytes=1 << 30)
    app = create_app(llm, sched, ServerSettings(MODEL, max_tokens_limit=64))
    long = [7] * (llm.config.max_position + 1)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": long, "max_tokens": 4})
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
            assert err["param"] == "prompt" and "truncat" not in err["message"], err
    finally:
        sched.close()


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e300])
@pytest.mark.parametrize("temperature", [0.7, 1e-300])
def test_extreme_repetition_penalties_stay_finite(penalty: float, temperature: float) -> None:
    """Found by the schema fuzzer: a penalty of 1e-300 turned seen logits into inf, and sampling into NaN."""
    import warnings

    import numpy as np

    from glm_runtime.sampling import Sampler, SamplingParams

    s = Sampler(SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=1), 1, 10)
    s.observe(0, [1, 2, 3])
    z = np.array([[1, -2, 3, 0.5, 0, 0, 0, 0, 0, 0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning noise in the server log either
        probs = s.probabilities(z[0])
        token = int(s(z.copy())[0])
    assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-9 and probs[token] > 0
