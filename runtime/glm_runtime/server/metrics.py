"""``/metrics``: responses counted by a pure-ASGI middleware, the scheduler's counters and gauges, written in
Prometheus' text exposition format."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glm_runtime.scheduler import Scheduler

#: Paths counted under their own name (anything else is "other": no unbounded label set from clients).
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/tokenizer_info")


@dataclass
class Counters:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)


class MetricsMiddleware:
    """Pure-ASGI middleware counting responses by path and status (no buffering of streamed bodies)."""

    def __init__(self, app: Any, counters: Counters) -> None:
        self.app, self.counters = app, counters

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        path = path if path in ROUTES else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                key = (path, int(message["status"]))
                self.counters.requests[key] = self.counters.requests.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def prometheus_text(scheduler: Scheduler, counters: Counters) -> str:
    """``/metrics`` in Prometheus' text exposition format (written by hand: no client library needed)."""
    st, snap = scheduler.stats, scheduler.snapshot()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                     for labels, value in samples)

    metric("glm_http_requests_total", "counter", "HTTP responses by path and status code.",
           [(f'{{path="{p}",code="{c}"}}', v) for (p, c), v in sorted(counters.requests.items())])
    metric("glm_sequences_running", "gauge", "Sequences in the decode batch or being prefilled.",
           [("", snap["running"])])
    metric("glm_sequences_queued", "gauge", "Sequences waiting for a row.", [("", snap["queued"])])
    metric("glm_sequences_max", "gauge", "Rows of the KV pool (--max-concurrency).", [("", snap["max_concurrency"])])
    metric("glm_sequences_submitted_total", "counter", "Sequences accepted.", [("", st.submitted)])
    metric("glm_sequences_rejected_total", "counter", "Sequences refused because the server was full (429).",
           [("", st.rejected)])
    metric("glm_sequences_finished_total", "counter", "Sequences ended, by reason.",
           [(f'{{reason="{r}"}}', v) for r, v in sorted(st.finished.items())])
    metric("glm_prompt_tokens_total", "counter", "Prompt tokens of admitted sequences.", [("", st.prompt_tokens)])
    metric("glm_generation_tokens_total", "counter", "Tokens generated.", [("", st.generated_tokens)])
    metric("glm_decode_steps_total", "counter", "Batched decode steps run.", [("", st.decode_steps)])
    metric("glm_decode_rows_total", "counter", "Sum of decode batch sizes (mean batch = rows / steps).",
           [("", st.decode_rows)])
    metric("glm_time_to_first_token_seconds", "summary", "Submit to first token.",
           [("_sum", float(st.ttft_seconds_sum)), ("_count", st.ttft_count)])
    metric("glm_queue_seconds_total", "counter", "Time sequences waited for a row.",
           [("", float(st.queue_seconds_sum))])
    metric("glm_kv_pool_bytes", "gauge", "Bytes of the KV pool now.", [("", snap["kv_bytes"])])
    metric("glm_kv_pool_slots", "gauge", "Cache length of the KV pool now.", [("", snap["cache_len"])])
    metric("glm_kv_pool_max_bytes", "gauge", "The pool's bound (KV + scratch + resize) checked at start.",
           [("", snap["kv_max_bytes"])])
    metric("glm_kv_budget_bytes", "gauge", "The KV budget.", [("", snap["kv_budget_bytes"])])
    metric("glm_prefill_tokens_total", "counter", "Prompt tokens run through the engine (the rest came from the "
           "prefix cache or a sibling's prefill).", [("", st.prefill_tokens)])
    metric("glm_shared_prefill_tokens_total", "counter", "Prompt tokens of n > 1 siblings copied from one prefill.",
           [("", st.shared_prefill_tokens)])
    metric("glm_grammar_tokens_total", "counter", "Tokens sampled under a grammar mask (structured output).",
           [("", st.grammar_tokens)])
    metric("glm_grammar_seconds_total", "counter", "Time computing and applying grammar masks (mean per token = "
           "seconds / tokens).", [("", float(st.grammar_seconds))])
    prefix = snap["prefix"]
    if prefix is not None:
        metric("glm_prefix_cache_queries_total", "counter", "Sequences looked up in the prefix cache.",
               [("", prefix.lookups)])
        metric("glm_prefix_cache_hits_total", "counter", "Sequences that reused at least one cached block.",
               [("", prefix.hits)])
        metric("glm_prefix_cache_hit_rate", "gauge", "Hits / queries since start.",
               [("", float(prefix.hits / prefix.lookups) if prefix.lookups else 0.0)])
        metric("glm_prefix_cache_saved_tokens_total", "counter", "Prompt tokens not prefilled thanks to the cache.",
               [("", prefix.hit_tokens)])
        metric("glm_prefix_cache_token_hit_rate", "gauge", "Saved / prompt tokens since start.",
               [("", float(prefix.hit_tokens / st.prompt_tokens) if st.prompt_tokens else 0.0)])
        metric("glm_prefix_cache_bytes", "gauge", "Bytes of K/V blocks held.", [("", prefix.bytes)])
        metric("glm_prefix_cache_capacity_bytes", "gauge", "What the KV budget leaves beside the pool (or "
               "--prefix-cache-gb).", [("", prefix.capacity_bytes)])
        metric("glm_prefix_cache_evicted_blocks_total", "counter", "Blocks evicted (least recently used).",
               [("", prefix.evicted_blocks)])
    metric("glm_engine_errors_total", "counter", "Engine steps that failed.", [("", st.engine_errors)])
    metric("glm_process_resident_memory_bytes", "gauge", "Resident set size of the server.", [("", rss())])
    return "\n".join(lines) + "\n"


def rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
