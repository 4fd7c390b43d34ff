"""Ray Serve: the OpenAI-compatible server of :mod:`glm_runtime.server` as a Serve deployment, for more replicas
than one process (or one machine) holds, autoscaling, and replicas that die without taking the service down.

Why this shape:
- One app, two hosts: each replica builds the same FastAPI app as ``glm-runtime serve`` (``create_app``) over its
  own engine and :class:`~glm_runtime.scheduler.Scheduler`, and Serve's HTTP proxy forwards requests to it through
  ``@serve.ingress`` (late-bound: the app needs the engine the replica loads in ``__init__``). Routes, errors,
  auth, streaming, tools and ``/metrics`` are therefore the single server's, not a second implementation.
- ``max_ongoing_requests`` = the scheduler's ``max_concurrency + max_queue``: Serve never sends a replica more
  than its scheduler accepts, so Serve queues (and sheds with its own 503 past ``max_queued_requests``) where
  the single server would answer 429. Autoscaling targets ``max_concurrency`` ongoing requests per replica: a
  replica whose rows are all busy is a reason for another one.
- Health: Serve calls :meth:`GLMReplica.check_health` every ``health_check_period_s``; it passes when the engine
  thread is alive and has made progress since the last check, or, when idle, when a one-token probe runs through
  the scheduler and the engine. A failing replica is replaced by Serve.
- Shutdown drains as the single server does: Serve stops routing to the replica, waits up to
  ``graceful_shutdown_timeout_s`` for in-flight requests, then ``__del__`` closes the scheduler.
- Routing: :class:`glm_runtime.ray_router.ConversationAffinityRouter` (the turns of one ``x-session-id`` go to
  the replica holding their KV), or Serve's default power-of-two router (``router="pow2"``).

Entry points: ``glm-runtime serve ARTIFACT --ray --replicas N [--autoscale MIN:MAX]`` (:func:`run`), and the
application builder :func:`app` for ``serve run glm_runtime.ray_app:app artifact=out/`` and Serve config files
(``serve build`` / ``serve deploy``; ``docs/deploy/``). ``ray[serve]`` is the ``ray`` extra; nothing else in
the runtime imports this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from glm_runtime.scheduler import QueueFullError, Scheduler, SchedulerClosedError, Sequence

log = logging.getLogger("glm_runtime.ray_app")

AFFINITY_ROUTER = "glm_runtime.ray_router:ConversationAffinityRouter"
DEFAULT_ROUTER = "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter"
ROUTERS = {"affinity": AFFINITY_ROUTER, "pow2": DEFAULT_ROUTER}
DEPLOYMENT_NAME = "GLMReplica"
#: Response header naming the replica that answered (for load tests and for debugging affinity).
REPLICA_HEADER = b"x-glm-replica"


@dataclass
class ReplicaConfig:
    """What one replica loads and how its server behaves: ``glm-runtime serve``'s options, as plain data (it
    travels to the replicas and lives in Serve config files)."""

    artifact: str
    model_name: str | None = None
    #: Read on the replica (a Kubernetes secret mounted as a file); the key itself never travels in the config.
    api_key_file: str | None = None
    max_concurrency: int = 8
    max_queue: int = 32
    max_model_len: int | None = None
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1 << 20
    threads: int | None = None
    providers: list[str] | None = None
    verify: str = "hash"
    prefill_chunk: int = 512
    kv_budget_gb: float | None = None
    #: The scheduler's prefix cache bound (``serve --prefix-cache-gb``; 0 = off); None: the scheduler's default.
    prefix_cache_gb: float | None = None
    #: Seconds a request has to send its whole body (``serve --body-timeout``; HTTP 408 beyond).
    body_timeout: float = 30.0
    #: ``serve --int4-kernel``: auto / ort (None: $GLM_RUNTIME_INT4_KERNEL on the replica, else auto).
    int4_kernel: str | None = None
    #: ``serve --attention-kernel``: auto / ort (None: $GLM_RUNTIME_ATTENTION_KERNEL on the replica, else auto).
    attention_kernel: str | None = None
    #: ``serve --hugepages/--no-hugepages`` (None: $GLM_RUNTIME_HUGEPAGES on the replica, else on).
    hugepages: bool | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ReplicaConfig:
        """From ``serve run``'s ``key=value`` strings or a config file's ``args`` (typed values pass through)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown replica option(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        if "artifact" not in args:
            raise ValueError("the app needs artifact=PATH (a directory made by glm-export, visible on every node)")
        out: dict[str, Any] = {}
        for name, value in args.items():
            kind = str(fields[name].type)
            if isinstance(value, str) and value.lower() in ("", "none", "null") and "None" in kind:
                value = None
            elif isinstance(value, str) and kind.startswith("int"):
                value = int(value)
            elif isinstance(value, str) and kind.startswith("bool"):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"{name}={value!r}: give true or false")
                value = value.lower() in ("1", "true", "yes", "on")
            elif isinstance(value, str) and kind.startswith("float"):
                value = float(value)
            elif isinstance(value, str) and kind.startswith("list"):
                value = [p for p in value.split(",") if p]
            out[name] = value
        for name in ("artifact", "api_key_file"):  # replicas may run in another directory: make paths absolute
            if out.get(name):
                out[name] = os.path.abspath(out[name])
        return cls(**out)


class _ReplicaHeader:
    """ASGI middleware adding ``x-glm-replica`` to every response (which replica answered)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.value)]
            await send(message)
        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


@serve.ingress()
class GLMReplica:
    """One replica: one engine, one scheduler, the server's FastAPI app over them."""

    def __init__(self, config: dict[str, Any]) -> None:
        from glm_runtime.api import load
        from glm_runtime.server import Limits, ServerSettings, read_api_key

        cfg = ReplicaConfig(**config)
        self.config = cfg
        key = read_api_key(cfg.api_key_file) if cfg.api_key_file else None
        budget = int(cfg.kv_budget_gb * 1e9) if cfg.kv_budget_gb is not None else None
        self.llm = load(cfg.artifact, providers=cfg.providers, threads=cfg.threads, verify=cfg.verify,
                        prefill_chunk=cfg.prefill_chunk, kv_budget_bytes=budget, int4_kernel=cfg.int4_kernel,
                        attention_kernel=cfg.attention_kernel, hugepages=cfg.hugepages)
        if hasattr(self.llm.engine, "settle") and getattr(self.llm.engine, "hugepages", False):
            self.llm.engine.settle()  # the int4 weights onto huge pages before the replica takes requests
        prefix = int(cfg.prefix_cache_gb * 1e9) if cfg.prefix_cache_gb is not None else None
        self.scheduler = Scheduler(self.llm.engine, max_concurrency=cfg.max_concurrency, max_queue=cfg.max_queue,
                                   prefill_chunk=cfg.prefill_chunk, kv_budget_bytes=self.llm.generator.kv_budget_bytes,
                                   max_cache_len=cfg.max_model_len, prefix_cache_bytes=prefix)
        name = cfg.model_name or os.path.basename(os.path.normpath(cfg.artifact))
        # Connection-level limits (head / send deadlines, connection count) are Serve's proxy's: it owns the
        # sockets. The body deadline and the request slots act inside the app, as in the single server.
        self.settings = ServerSettings(name, key, cfg.max_body_bytes, cfg.max_tokens_limit,
                                       limits=Limits(body_timeout=cfg.body_timeout))
        self._progress = -1
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica_id = f"pid-{os.getpid()}"
        log.info("replica %s: %s, %d concurrent sequences", self.replica_id, self.llm.engine.describe(),
                 cfg.max_concurrency)

    def __serve_build_asgi_app__(self) -> Any:
        from glm_runtime.server import create_app

        return _ReplicaHeader(create_app(self.llm, self.scheduler, self.settings), self.replica_id)

    async def check_health(self) -> None:
        """Raise (Serve then replaces this replica) unless the engine works: progress since the last check while
        busy, or a one-token probe through the scheduler and the engine while idle."""
        snap = self.scheduler.snapshot()
        if not snap["alive"]:
            raise RuntimeError("the engine thread has stopped")
        st = self.scheduler.stats
        progress = st.decode_steps + st.prefill_calls
        if snap["running"] and progress != self._progress:
            self._progress = progress
            return
        probe = Sequence([0], 1)
        try:
            self.scheduler.submit(probe)
        except QueueFullError:
            if progress != self._progress:  # full but moving
                self._progress = progress
                return
            raise RuntimeError("the scheduler is full and made no progress since the last health check") from None
        except SchedulerClosedError:
            raise RuntimeError("the scheduler is closed") from None
        if not await asyncio.to_thread(probe.wait, 20.0):
            self.scheduler.cancel(probe)
            raise RuntimeError("a one-token probe did not finish within 20 s")
        if probe.finish_reason == "error":
            raise RuntimeError(f"the engine failed a one-token probe: {probe.error}")
        self._progress = self.scheduler.stats.decode_steps + self.scheduler.stats.prefill_calls

    def __del__(self) -> None:
        # Serve has already waited graceful_shutdown_timeout_s for in-flight requests: end what is left.
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close(timeout=5.0)


def deployment_options(cfg: ReplicaConfig, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                       router: str = "affinity", num_cpus: float | None = None,
                       shutdown_timeout: float = 30.0) -> dict[str, Any]:
    """Serve deployment options matched to the scheduler (see the module docstring)."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
    opts: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": cfg.max_concurrency + cfg.max_queue,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": shutdown_timeout,
        "graceful_shutdown_wait_loop_s": 1.0,
        "ray_actor_options": {"num_cpus": num_cpus if num_cpus is not None else float(cfg.threads or 1)},
        "request_router_config": RequestRouterConfig(request_router_class=ROUTERS[router],
                                                     request_router_kwargs={"imbalance_threshold":
                                                                            cfg.max_concurrency}
                                                     if router == "affinity" else {}),
    }
    if autoscale is not None:
        lo, hi = autoscale
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}")
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "initial_replicas": max(lo, min(replicas, hi)),
                                      "target_ongoing_requests": cfg.max_concurrency}
    else:
        if replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {replicas}")
        opts["num_replicas"] = replicas
    return opts


def build(cfg: ReplicaConfig, **options: Any) -> Application:
    """The Serve application: :class:`GLMReplica` with :func:`deployment_options` (``options`` go there)."""
    return serve.deployment(GLMReplica).options(**deployment_options(cfg, **options)).bind(dataclasses.asdict(cfg))


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(lo), int(hi)
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX replicas, like 1:8; got {text!r}") from None


def app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run glm_runtime.ray_app:app artifact=out/ [replicas=2] [autoscale=1:8]
    [router=pow2] [num_cpus=2] [shutdown_timeout=30] [any ReplicaConfig field=...]`` and Serve config files."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    autoscale = parse_autoscale(args.pop("autoscale", None))
    router = str(args.pop("router", "affinity"))
    num_cpus = args.pop("num_cpus", None)
    shutdown_timeout = float(args.pop("shutdown_timeout", 30.0))
    return build(ReplicaConfig.from_args(args), replicas=replicas, autoscale=autoscale, router=router,
                 num_cpus=float(num_cpus) if num_cpus is not None else None, shutdown_timeout=shutdown_timeout)


def run(cfg: ReplicaConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        num_cpus: float | None = None, ready: threading.Event | None = None, **options: Any) -> None:
    """``glm-runtime serve --ray``: start (or join, with ``address``) Ray, run the app behind Serve's HTTP proxy
    on ``host:port`` and block until SIGINT/SIGTERM; then delete the app (in-flight requests drain for up to
    ``shutdown_timeout`` seconds) and shut Serve down."""
    import ray

    from glm_runtime.ray_proxy import CALLBACK

    if address is None:
        # Serve's proxy reads this at start: replica failures reach clients as OpenAI-style errors (ray_proxy.py).
        # Every process of the Ray instance started here inherits it; a cluster started elsewhere sets it itself.
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", CALLBACK)
        ray.init(num_cpus=None, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(cfg, num_cpus=num_cpus, **options), name="glm", route_prefix="/", blocking=False)
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
        log.info("stopping: in-flight requests drain, then the replicas stop")
        t0 = time.monotonic()
        serve.delete("glm")
        log.info("drained in %.1f s", time.monotonic() - t0)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        serve.shutdown()
        ray.shutdown()
