"""Slow, idle and flooding clients: deadlines on every phase of a request, a connection limit that sheds idle
connections instead of refusing everyone, and request slots that never block ``/health``.

Why this module exists: uvicorn alone has no deadline for the request head (a socket that connects and sends
nothing, or half a request line, is kept forever) and no body-read deadline; its ``limit_concurrency`` counts
*connections*, so about a hundred idle sockets made every request, ``/health`` included, a 503 for as long as they
stayed open (issue 19, D4). Here:

- **Head deadline** (``head_timeout``): from the moment a connection opens, or its previous response ends, the
  client has this long to send a complete request head; otherwise the connection is closed. This bounds both the
  idle socket and the slowloris that trickles a header byte every few seconds (uvicorn's keep-alive timer is reset
  by any byte).
- **Body deadline** (``body_timeout``): the whole body must arrive within this long (HTTP 408 otherwise), enforced
  where the body is read (:func:`read_deadline`).
- **Connection limit with shedding** (``max_connections``): past the limit, idle connections are closed to make
  room, never a connection with a request in flight. Connections that have not yet sent a request (new, silent
  ones: what an idle-socket flood is made of) go first, the longest-silent of them first; keep-alive connections of
  clients that already completed a request go only after those. Only when every connection is busy is the newcomer
  itself turned away (503). A genuine client sends its request head within milliseconds of connecting, so a
  flood of silent sockets can no longer starve it.
- **Send deadline** (``send_timeout``): a client that stops reading its response (a stream it never consumes) is
  disconnected once writes to it have been blocked this long, which cancels its sequences and frees its request
  slot; otherwise such clients could hold every slot for ever.
- **Request slots** (``max_requests``): requests in flight beyond this get an immediate 503 with ``Retry-After``
  instead of buffering their bodies; ``/health`` and ``/metrics`` never count and are always answered, so a
  liveness probe does not restart a server that is merely busy.

The protocol is uvicorn's own h11 implementation with these rules added (a subclass: the HTTP parsing stays
uvicorn's and h11's, whose header size limit of 16 KiB applies).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("glm_runtime.server")

#: Paths answered whatever the load (liveness and monitoring).
ALWAYS_ANSWERED = ("/health", "/metrics")
#: File descriptors kept free for the model, logs and the listening socket when the connection limit is derived
#: from the process's descriptor limit.
RESERVED_FDS = 64


@dataclass(frozen=True)
class Limits:
    """Deadlines (seconds) and bounds for client connections; ``None`` bounds are derived at start."""

    head_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    send_timeout: float = 60.0
    max_connections: int | None = None
    max_requests: int | None = None

    def request_slots(self, max_concurrency: int, max_queue: int) -> int:
        """Requests in flight: a few times what the scheduler can hold (beyond that a request could only get a
        429 after its body was read)."""
        return self.max_requests or 2 * (max_concurrency + max_queue) + 16

    def connection_limit(self) -> int:
        """Open connections: as given, else up to the descriptor limit (at most 1000)."""
        conns = self.max_connections or min(1000, descriptor_limit() - RESERVED_FDS)
        if conns < 1:
            raise ValueError(f"connection limit {conns} must be at least 1 (raise the open-files limit: ulimit -n)")
        return conns


def descriptor_limit() -> int:
    """The soft open-files limit, raised to the hard limit first (each connection is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


class ConnectionTable:
    """The open connections of one server, oldest first, and the shedding rule (module docstring)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open: dict[GuardedH11Protocol, None] = {}  # insertion order = age
        self.shed = 0
        self.head_timeouts = 0
        self.send_timeouts = 0

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Register ``conn``; close idle connections while over the limit. False: ``conn`` itself is refused."""
        self.open[conn] = None
        while len(self.open) > self.max_connections:
            victim = self._victim()
            if victim is None or victim is conn:
                self.open.pop(conn, None)
                return False
            self.shed += 1
            victim.close_idle()
        return True

    def _victim(self) -> GuardedH11Protocol | None:
        idle = [c for c in self.open if c.idle()]
        silent = [c for c in idle if c.served == 0 and c is not self._newest()]
        if silent:
            return silent[0]  # the longest-silent connection that never sent a request
        served = [c for c in idle if c.served > 0]
        if served:
            return served[-1]  # then the newest keep-alive connection
        return idle[0] if idle else None  # the newcomer, when nothing else can go

    def _newest(self) -> GuardedH11Protocol | None:
        return next(reversed(self.open), None)

    def remove(self, conn: GuardedH11Protocol) -> None:
        self.open.pop(conn, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and admission through a :class:`ConnectionTable`.

    Subclassed per server by :func:`protocol_class` (uvicorn instantiates the class itself).
    """

    table: ConnectionTable
    limits: Limits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.served = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        if not self.table.admit(self):
            self._refuse()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.remove(self)
        self._cancel_head_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a complete request head arrived: the app's deadlines take over
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        self.served += 1
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head (or silence) is timed from here
        super().on_response_complete()

    def pause_writing(self) -> None:
        """The client is not reading: start the send deadline (uvicorn's own flow control pauses the app)."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timeout)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _send_timeout(self) -> None:
        self._send_timer = None
        self.table.send_timeouts += 1
        self.transport.abort()  # connection_lost then unblocks the app's pending send and marks it disconnected

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def idle(self) -> bool:
        """No request in flight (nothing is lost by closing it)."""
        return self.cycle is None or self.cycle.response_complete

    def close_idle(self) -> None:
        self.table.remove(self)
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.close()

    # ---- internals ----------------------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.idle() and not self.transport.is_closing():
            self.table.head_timeouts += 1  # no answer: a client that sent no complete head gets a closed socket
            self.transport.close()

    def _refuse(self) -> None:
        """Every connection is busy: say so in HTTP (the client may not have sent anything yet; that's fine)."""
        body = b'{"error":{"message":"the server is at its connection limit; retry shortly","type":"server_error",' \
               b'"param":null,"code":"service_unavailable"}}'
        head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
        self.transport.write(head + body)
        self.transport.close()


def protocol_class(limits: Limits) -> tuple[type[GuardedH11Protocol], ConnectionTable]:
    """A protocol class for one server (uvicorn's ``http=``), with the table it admits connections through."""
    table = ConnectionTable(limits.connection_limit())
    cls = type("GuardedH11Protocol", (GuardedH11Protocol,), {"table": table, "limits": limits})
    return cls, table


class RequestSlots:
    """Pure-ASGI middleware: at most ``limit`` requests in flight (503 beyond), ``/health`` and ``/metrics``
    exempt so they are answered whatever the load."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.in_flight, self.refused = app, limit, 0, 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope.get("path") in ALWAYS_ANSWERED:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.refused += 1
            body = (b'{"error":{"message":"the server has too many requests in flight; retry shortly",'
                    b'"type":"server_error","param":null,"code":"service_unavailable"}}')
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def read_deadline(seconds: float) -> AsyncIterator[None]:
    """Raise :class:`BodyTimeoutError` when the block (reading a request body) takes longer than ``seconds``."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise BodyTimeoutError(seconds) from None


class BodyTimeoutError(Exception):
    """The client did not send its whole body in time (HTTP 408)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s")
        self.seconds = seconds
