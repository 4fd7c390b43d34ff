"""The engine interface every backend implements, and the KV-memory arithmetic shared by all of them.

An engine runs one step of the exported graph (``docs/graph.md``): token ids and their positions in, the
logits of one position per sequence out, K/V written into a cache the engine owns. Everything above it (the
decode loop, batching, prefix reuse, sampling) is backend-agnostic, so a TensorRT engine only has to provide
:class:`Engine` and :class:`KVCache`.

The memory arithmetic lives here rather than in an engine because the decision "does this request fit" must
be made, and explained, before a backend allocates anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from glm_runtime.config import DTYPE_BYTES, ModelConfig

#: Cache lengths are rounded up to a multiple of this: ORT's attention costs the whole buffer, so a coarse
#: rounding wastes decode time, while a fine one makes multi-turn growth reallocate more often.
CACHE_LEN_MULTIPLE = 64
#: Default share of the RAM available at load time that KV caches (plus prefill attention scratch) may use.
DEFAULT_BUDGET_FRACTION = 0.8
#: Prefill chunks are never shrunk below this to fit the attention scratch: smaller chunks re-read every
#: weight once per chunk and make prefill weight-bandwidth bound.
MIN_PREFILL_CHUNK = 16


class MemoryBudgetError(ValueError):
    """A request whose KV cache would not fit the memory budget; the message carries the arithmetic."""


@runtime_checkable
class KVCache(Protocol):
    """Per-layer K and V buffers ``[batch, kv_heads, cache_len, head_dim]`` owned by an engine.

    Row ``b`` of every buffer is one sequence slot; slot position ``p`` holds the K/V of that sequence's
    token at position ``p`` (the graph's convention), so what is valid is tracked by the caller as a length.
    """

    batch: int
    cache_len: int

    @property
    def nbytes(self) -> int: ...

    def addresses(self) -> list[int]:
        """Device addresses of the buffers: constant between resizes (the update is in place)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """One step of the graph against a KV cache.

    ``step`` returns the logits ``[batch, vocab]`` (float32) of the position ``logits_index`` picks in each
    row; the array is a view of an engine buffer, valid until the next ``step`` on the same cache. Passing the
    *same* numpy arrays again (mutated in place) lets an engine skip rebinding them: the decode loop does that.
    """

    config: ModelConfig
    cache_dtype: str

    def allocate(self, batch: int, cache_len: int) -> KVCache: ...

    def resize(self, cache: KVCache, cache_len: int, keep: int) -> None:
        """Give ``cache`` a new length, preserving slots ``[0, keep)`` of every row."""
        ...

    def step(self, cache: KVCache, input_ids: np.ndarray, position_ids: np.ndarray,
             logits_index: np.ndarray) -> np.ndarray: ...

    @property
    def run_seconds(self) -> float:
        """Total time spent inside the backend's run call (to measure the runtime's own overhead)."""
        ...

    def describe(self) -> str: ...


@runtime_checkable
class RowEngine(Engine, Protocol):
    """An engine that can run a step on a contiguous range of a cache's rows, and move a row's K/V.

    What continuous batching needs (:mod:`glm_runtime.scheduler`): one pool of ``max_concurrency`` rows whose
    active sequences are kept packed in rows ``[0, n)``. The row is the outermost dimension of every buffer, so
    rows ``[start, stop)`` are one contiguous block: a view is the same memory at an offset (a numpy slice for
    ONNX Runtime on the CPU, a device pointer offset for CUDA and TensorRT), never a copy. A separate protocol
    (not new methods on :class:`Engine`) so engines written against the original interface still conform.
    """

    def rows(self, cache: KVCache, start: int, stop: int) -> KVCache:
        """Rows ``[start, stop)`` of ``cache`` as a cache of their own (shared memory; ``step`` on it writes the
        pool). Valid until ``cache`` is resized; engines may return the same view object again. The logits a step
        on a view returns are valid until the next step on any view of ``cache`` (views may share one buffer)."""
        ...

    def copy_rows(self, cache: KVCache, src: int, dst: int, length: int) -> None:
        """Copy slots ``[0, length)`` of row ``src`` to row ``dst`` in every K/V buffer of ``cache``."""
        ...


# ---- memory arithmetic ----------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_memory_bytes() -> int:
    """RAM the OS can give us now (``MemAvailable``; total physical memory where that is unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def default_budget_bytes(engine: Any = None) -> int:
    """The default KV budget: a fraction of the available RAM, less what ``engine`` is still about to take
    (``memory_reserved``: the int4 weights queued for their huge-page copies, which replace file pages that count
    as available until then)."""
    reserved = engine.memory_reserved() if engine is not None and hasattr(engine, "memory_reserved") else 0
    return int(DEFAULT_BUDGET_FRACTION * max(0, available_memory_bytes() - reserved))


def round_cache_len(needed: int, max_position: int, multiple: int = CACHE_LEN_MULTIPLE) -> int:
    """``needed`` rounded up to ``multiple`` but not beyond the model's context (unless ``needed`` is)."""
    rounded = -(-needed // multiple) * multiple
    return max(needed, min(rounded, max_position))


def attention_scratch_bytes(cfg: ModelConfig, batch: int, chunk: int, cache_len: int) -> int:
    """Working memory of one prefill chunk's attention: fp32 scores and probabilities per query head.

    ORT's CPU ``Attention`` materialises ``[batch, heads, chunk, cache_len]`` (measured: peak RSS grows
    ~1.5x that product), which is what bounds the prefill chunk for long contexts.
    """
    return 2 * batch * cfg.num_heads * chunk * cache_len * 4


@dataclass(frozen=True)
class KVPlan:
    """What a request will allocate, computed from the config before anything is allocated."""

    batch: int
    cache_len: int
    bytes_per_token: int
    dtype: str
    prefill_chunk: int
    scratch_bytes: int
    budget_bytes: int
    cfg: ModelConfig
    #: Memory that exists only while the cache is resized (a pool re-allocates one buffer at a time).
    transient_bytes: int = 0

    @property
    def kv_bytes(self) -> int:
        return self.batch * self.cache_len * self.bytes_per_token

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.scratch_bytes + self.transient_bytes

    def arithmetic(self) -> str:
        c = self.cfg
        return (f"KV cache {self.batch} x {self.cache_len} tokens x {format_bytes(self.bytes_per_token)}/token "
                f"({c.num_layers} layers x K,V x {c.num_kv_heads} groups x {c.head_dim} x "
                f"{DTYPE_BYTES[self.dtype]} bytes {self.dtype}) = {format_bytes(self.kv_bytes)}, "
                f"+ prefill attention scratch {format_bytes(self.scratch_bytes)} (chunk {self.prefill_chunk}"
                + (f", one row at a time), + one buffer while resizing {format_bytes(self.transient_bytes)}"
                   if self.transient_bytes else ")")
                + f"; budget {format_bytes(self.budget_bytes)}")


def plan_kv(cfg: ModelConfig, dtype: str, batch: int, cache_len: int, prefill_chunk: int,
            budget_bytes: int) -> KVPlan:
    """Size a request's KV cache and prefill chunk against the budget, or refuse it with the arithmetic.

    The chunk shrinks (down to :data:`MIN_PREFILL_CHUNK`) before the request is refused: a long context
    should cost prefill speed before it costs the answer.
    """
    per_token = cfg.kv_cache_bytes_per_token(dtype)
    chunk = max(1, prefill_chunk)
    kv = batch * cache_len * per_token
    while chunk > MIN_PREFILL_CHUNK and kv + attention_scratch_bytes(cfg, batch, chunk, cache_len) > budget_bytes:
        chunk = max(MIN_PREFILL_CHUNK, chunk // 2)
    plan = KVPlan(batch, cache_len, per_token, dtype, chunk, attention_scratch_bytes(cfg, batch, chunk, cache_len),
                  budget_bytes, cfg)
    if plan.total_bytes > budget_bytes:
        raise MemoryBudgetError(
            f"request refused: {plan.arithmetic()}. Lower max_new_tokens, the prompt length or the batch, or "
            f"raise the budget (load(..., kv_budget_bytes=...) / --kv-budget-gb) if the memory is really there"
        )
    return plan


def plan_pool(cfg: ModelConfig, dtype: str, rows: int, cache_len: int, prefill_chunk: int,
              budget_bytes: int) -> KVPlan:
    """Size a continuous-batching pool: ``rows`` sequences of ``cache_len`` slots, or refuse with the arithmetic.

    Unlike :func:`plan_kv`'s request, a pool prefills one row at a time (the attention scratch is that of a
    batch of 1) and decodes all rows at once (one query per row: ``rows x heads x cache_len`` fp32 scores); it
    is grown and shrunk buffer by buffer, so a resize briefly holds one extra K or V buffer of the new size.
    """
    per_token = cfg.kv_cache_bytes_per_token(dtype)
    kv = rows * cache_len * per_token
    transient = kv // (2 * cfg.num_layers)
    decode = attention_scratch_bytes(cfg, rows, 1, cache_len)
    chunk = max(1, prefill_chunk)

    def scratch(c: int) -> int:
        return attention_scratch_bytes(cfg, 1, c, cache_len) + decode

    while chunk > MIN_PREFILL_CHUNK and kv + transient + scratch(chunk) > budget_bytes:
        chunk = max(MIN_PREFILL_CHUNK, chunk // 2)
    plan = KVPlan(rows, cache_len, per_token, dtype, chunk, scratch(chunk), budget_bytes, cfg, transient)
    if plan.total_bytes > budget_bytes:
        raise MemoryBudgetError(
            f"the KV pool does not fit: {plan.arithmetic()}. Lower --max-concurrency or --max-model-len, or raise "
            f"--kv-budget-gb if the memory is really there")
    return plan


def max_pool_cache_len(cfg: ModelConfig, dtype: str, rows: int, prefill_chunk: int, budget_bytes: int,
                       limit: int | None = None) -> KVPlan:
    """The plan of the longest pool (cache length a multiple of :data:`CACHE_LEN_MULTIPLE`, at most the
    model's context and ``limit``) whose ``rows`` fit the budget: every request the pool admits fits in it."""
    top = min(cfg.max_position, limit or cfg.max_position)
    lo, hi = 1, max(1, top // CACHE_LEN_MULTIPLE)
    best = plan_pool(cfg, dtype, rows, min(top, CACHE_LEN_MULTIPLE), prefill_chunk, budget_bytes)  # raises
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            best = plan_pool(cfg, dtype, rows, mid * CACHE_LEN_MULTIPLE, prefill_chunk, budget_bytes)
            lo = mid + 1
        except MemoryBudgetError:
            hi = mid - 1
    if best.cache_len == (top // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE and top % CACHE_LEN_MULTIPLE:
        try:  # a context that is not a multiple of 64 (rare) can still be used whole
            best = plan_pool(cfg, dtype, rows, top, prefill_chunk, budget_bytes)
        except MemoryBudgetError:
            pass
    return best
