"""Running the app: uvicorn in the main thread, connections and deadlines as :mod:`.limits` sets them, and a
graceful stop on SIGTERM/SIGINT that lets in-flight requests finish before the engine thread stops."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Literal

import uvicorn

from glm_runtime.api import LLM
from glm_runtime.scheduler import Scheduler
from glm_runtime.server.app import create_app
from glm_runtime.server.context import ServerSettings
from glm_runtime.server.limits import protocol_class

log = logging.getLogger("glm_runtime.server")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def read_api_key(path: str | os.PathLike[str]) -> str:
    """The key from a file (not a command-line argument: those show up in ``ps``)."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror}") from None
    if len(key) < 8 or any(c.isspace() for c in key):
        raise ValueError(f"the API key in {path} must be one line of at least 8 non-blank characters")
    return key


def serve(llm: LLM, scheduler: Scheduler, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          shutdown_timeout: float = 30.0, max_connections: int | None = None,
          log_level: Literal["info", "warning", "error"] = "info") -> None:
    """Run the server in this (main) thread until SIGINT/SIGTERM, then shut down gracefully and return.

    On a signal: stop accepting, let in-flight requests finish for up to ``shutdown_timeout`` seconds, cancel
    what is left, stop the engine thread. Returns normally (exit code 0), unlike uvicorn's default of
    re-raising the signal.
    """
    class GracefulServer(uvicorn.Server):
        draining: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a graceful stop is a normal exit, not death by signal
            if self.draining is None:
                log.info("signal %d: stopping (in-flight requests get up to %.0f s)", sig, shutdown_timeout)
                # At the deadline the scheduler ends what is still running ("cancelled"): each response then
                # closes properly (final chunk, [DONE]) before uvicorn's own, later, hard cancellation.
                self.draining = threading.Timer(shutdown_timeout, lambda: scheduler.close(timeout=0))
                self.draining.daemon = True
                self.draining.start()

    if host not in LOOPBACK and settings.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(--api-key-file)", host)
    if max_connections is not None:
        settings = dataclasses.replace(settings, limits=dataclasses.replace(settings.limits,
                                                                            max_connections=max_connections))
    app = create_app(llm, scheduler, settings)
    # No uvicorn limit_concurrency: it counts idle sockets too, so a few hundred of them refused everyone (D4).
    protocol, _ = protocol_class(settings.limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout + 5, http=protocol,
                            timeout_keep_alive=max(1, round(settings.limits.keep_alive)))
    try:
        GracefulServer(config).run()
    finally:
        scheduler.close()
