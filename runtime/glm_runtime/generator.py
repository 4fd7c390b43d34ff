"""The decode loop: chunked prefill, batched lockstep decoding, KV slots and prefix reuse. Token ids only.

A :class:`DecodeBatch` is one request: ``batch`` right-padded sequences sharing one KV cache whose row ``b``
is sequence ``b``'s slot. Slot position ``p`` holds the K/V of the token at position ``p`` and the graph only
admits slots ``<= position`` (``docs/graph.md``), which is what makes every trick here cheap:

- right padding needs no mask: a padded tail writes slots its sequence will overwrite before reading them;
- a finished row keeps running in lockstep (its matmul rows are nearly free while decoding is bandwidth
  bound) but stops advancing, so it only ever rewrites one slot past its end;
- prefix reuse is bookkeeping: a :class:`Session` remembers which tokens its cache holds, a new prompt that
  starts with them prefills only the rest, and stale slots beyond the common prefix are simply overwritten;
- a long prompt is prefilled in chunks, each returning the logits of one position, so no full-prompt logits
  and no prompt x prompt attention matrix ever exist.

Sizes are decided before anything is allocated (:func:`glm_runtime.engine.plan_kv`), and a request that
cannot fit (context or memory) is refused before any compute. Text (stop strings, detokenization) is the
API's business: the caller drives :meth:`DecodeBatch.step` and may :meth:`DecodeBatch.finish` a row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glm_runtime.config import ModelConfig
from glm_runtime.engine import Engine, KVCache, KVPlan, plan_kv, round_cache_len
from glm_runtime.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512


class ContextLengthError(ValueError):
    """Prompt plus requested tokens exceed the model's context; raised before any compute."""


@dataclass
class Session:
    """A conversation's KV cache (one slot) and the token ids whose K/V it holds, for prefix reuse.

    ``tokens`` only ever lists tokens whose K/V a *completed* step wrote, so an interrupted step leaves the
    session conservative, never wrong.
    """

    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the conversation (the buffer is kept for the next one)."""
        self.tokens = []


@dataclass
class Timings:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    cache_len: int = 0
    prefill_chunk: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    engine_decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (per sequence; multiply by the batch for throughput)."""
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    @property
    def overhead_fraction(self) -> float:
        """Share of decode wall time spent outside the engine's run call (sampling, bookkeeping, text)."""
        return 1.0 - self.engine_decode_s / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
                "prefilled_tokens": self.prefilled_tokens, "generated_tokens": self.generated_tokens,
                "cache_len": self.cache_len, "prefill_chunk": self.prefill_chunk,
                "ttft_s": round(self.ttft_s, 6), "decode_s": round(self.decode_s, 6),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "overhead_fraction": round(self.overhead_fraction, 5)}


@dataclass
class Row:
    """One sequence of a batch."""

    prompt: list[int]
    max_new_tokens: int
    start: int = 0  # prompt tokens already in the cache (prefix reuse)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def next_position(self) -> int:
        """Where the last output token goes when fed back (its K/V slot)."""
        return len(self.prompt) + len(self.output) - 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


#: The advice a context-length error gives callers that can truncate (the HTTP API cannot: the server drops it).
TRUNCATE_HINT = ", or ask for truncation (truncate=True / --truncate)"


def fit_context(prompt: list[int], max_new_tokens: int, max_position: int, truncate: bool,
                keep_prefix: int = 0) -> list[int]:
    """The prompt unchanged if ``prompt + max_new_tokens`` fits the context; else an error or, if asked, the
    prompt with its oldest tokens after ``keep_prefix`` (``[gMASK]<sop>``) dropped."""
    total = len(prompt) + max_new_tokens
    if total <= max_position:
        return prompt
    if not truncate or max_new_tokens + keep_prefix + 1 > max_position:
        raise ContextLengthError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"context of {max_position} tokens: shorten the prompt, lower max_new_tokens"
            + ("" if truncate else TRUNCATE_HINT))
    drop = total - max_position
    log.warning("truncating the prompt: dropping its %d oldest tokens to fit the %d-token context", drop,
                max_position)
    return prompt[:keep_prefix] + prompt[keep_prefix + drop:]


class Generator:
    """Turns requests into :class:`DecodeBatch` es against one engine."""

    def __init__(self, engine: Engine, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 kv_budget_bytes: int | None = None) -> None:
        from glm_runtime.engine import default_budget_bytes

        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.engine = engine
        self.config: ModelConfig = engine.config
        self.prefill_chunk = prefill_chunk
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else default_budget_bytes(engine)

    def plan(self, batch: int, cache_len: int, prefill_tokens: int | None = None) -> KVPlan:
        """The request's memory, before allocating it; ``prefill_tokens`` (the longest uncached prompt part)
        caps the prefill chunk."""
        chunk = self.prefill_chunk if prefill_tokens is None else max(1, min(self.prefill_chunk, prefill_tokens))
        return plan_kv(self.config, self.engine.cache_dtype, batch, cache_len, chunk, self.kv_budget_bytes)

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
              params: SamplingParams, stop_ids: Sequence[int] = (), session: Session | None = None,
              t_request: float | None = None) -> DecodeBatch:
        """Check and size a request (raising before any compute if it can't run) and return it, not started.

        ``t_request`` (a ``time.perf_counter()`` value) is where time to first token counts from.
        """
        return DecodeBatch(self, prompts, max_new_tokens, params, stop_ids, session, t_request)


class DecodeBatch:
    """One request in flight. Call :meth:`step` until :attr:`done`; each call returns ``(row, token)`` pairs.

    Everything that can be refused (bad ids, context, memory) is checked in the constructor, before the engine
    runs or allocates.
    """

    def __init__(self, gen: Generator, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 params: SamplingParams, stop_ids: Sequence[int], session: Session | None,
                 t_request: float | None = None) -> None:
        self._t0 = time.perf_counter() if t_request is None else t_request
        cfg = gen.config
        if not prompts:
            raise ValueError("no prompts given")
        if session is not None and len(prompts) != 1:
            raise ValueError("a session (conversation cache) holds one sequence; got a batch of "
                             f"{len(prompts)}")
        news = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self.rows: list[Row] = []
        for b, (prompt, n) in enumerate(zip(prompts, news, strict=True)):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompt {b} is empty: give at least one token")
            bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {b} has token ids outside the vocabulary [0, {cfg.vocab_size}): "
                                 f"{bad[:5]}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"max_new_tokens must be a positive integer, got {n!r}")
            if len(ids) + n > cfg.max_position:
                raise ContextLengthError(
                    f"prompt {b} ({len(ids)} tokens) + max_new_tokens ({n}) = {len(ids) + n} exceeds the "
                    f"model's context of {cfg.max_position} tokens: shorten the prompt or lower max_new_tokens")
            self.rows.append(Row(ids, n))
        self.gen, self.engine, self.session = gen, gen.engine, session
        self.stop_ids = frozenset(int(s) for s in stop_ids)
        self.batch = len(self.rows)
        if session is not None:
            row = self.rows[0]
            # At least one prompt token must be run to get logits, even when all of them are cached.
            row.start = min(common_prefix(session.tokens, row.prompt), len(row.prompt) - 1)
        suffix = max(len(r.prompt) - r.start for r in self.rows)
        needed = max(max(len(r.prompt) + r.max_new_tokens for r in self.rows),
                     max(r.start for r in self.rows) + suffix)  # padded prefill writes up to here
        cache_len = round_cache_len(needed, cfg.max_position)
        cache = session.cache if session is not None else None
        if cache is not None and needed <= cache.cache_len <= 2 * cache_len:
            cache_len = cache.cache_len  # reuse as is (a much larger buffer would slow every step: shrink it)
        self.plan = gen.plan(self.batch, cache_len, suffix)
        allocating = cache is None or cache.cache_len != cache_len
        log.log(logging.INFO if allocating else logging.DEBUG, "%s", self.plan.arithmetic())
        if cache is None:
            cache = self.engine.allocate(self.batch, cache_len)
            if session is not None:
                session.cache = cache
        elif cache.cache_len != cache_len:
            log.info("resizing the conversation's KV cache from %d to %d tokens", cache.cache_len, cache_len)
            self.engine.resize(cache, cache_len, keep=self.rows[0].start)
        if session is not None:
            session.tokens = session.tokens[:self.rows[0].start]
        self.cache = cache
        self.sampler = Sampler(params, self.batch, cfg.vocab_size)
        for b, row in enumerate(self.rows):
            self.sampler.observe(b, row.prompt)
        self.timings = Timings(
            prompt_tokens=sum(len(r.prompt) for r in self.rows), reused_tokens=sum(r.start for r in self.rows),
            prefilled_tokens=sum(len(r.prompt) - r.start for r in self.rows), cache_len=cache_len,
            prefill_chunk=self.plan.prefill_chunk)
        # Decode-step inputs, allocated once and mutated in place: the engine binds them once.
        self._ids = np.zeros((self.batch, 1), np.int64)
        self._pos = np.zeros((self.batch, 1), np.int64)
        self._index = np.zeros((self.batch, 1), np.int64)
        self._decode_t0: float | None = None
        self._engine_t0 = 0.0
        self.started = False

    # ---- state ----------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)

    def active(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if r.finish_reason is None]

    def finish(self, row: int, reason: str) -> None:
        """End row ``row`` (e.g. a stop string matched in its text); its slot stops advancing."""
        if self.rows[row].finish_reason is None:
            self.rows[row].finish_reason = reason

    # ---- stepping -------------------------------------------------------------------------------------
    def step(self) -> list[tuple[int, int]]:
        """Run the prefill (first call) or one decode step; return the ``(row, token)`` pairs it produced."""
        if self.done:
            return []
        if not self.started:
            self.started = True
            logits = self._prefill()
            out = self._accept(logits, range(self.batch))
            for b, row in enumerate(self.rows):  # rows that already finished park on their next slot
                self._ids[b, 0], self._pos[b, 0] = row.output[-1], row.next_position
            self.timings.ttft_s = time.perf_counter() - self._t0
            return out
        t_enter = time.perf_counter()
        if self._decode_t0 is None:
            self._decode_t0, self._engine_t0 = t_enter, self.engine.run_seconds
        active = self.active()
        for b in active:  # finished rows keep their last token and position: they rewrite one dead slot
            row = self.rows[b]
            self._ids[b, 0] = row.output[-1]
            self._pos[b, 0] = row.next_position
        logits = self.engine.step(self.cache, self._ids, self._pos, self._index)
        if self.session is not None:
            self.session.tokens.append(self.rows[0].output[-1])
        out = self._accept(logits, active)
        t = self.timings
        t.decode_steps += 1
        t.decode_s = time.perf_counter() - self._decode_t0
        t.engine_decode_s = self.engine.run_seconds - self._engine_t0
        return out

    def _accept(self, logits: np.ndarray, rows: Sequence[int]) -> list[tuple[int, int]]:
        tokens = self.sampler(logits, rows)
        out = []
        for b in rows:
            row, tok = self.rows[b], int(tokens[b])
            row.output.append(tok)
            self.sampler.observe(b, (tok,))
            out.append((b, tok))
            if tok in self.stop_ids:
                row.finish_reason = "stop"
            elif len(row.output) >= row.max_new_tokens:
                row.finish_reason = "length"
        self.timings.generated_tokens += len(out)
        return out

    def _prefill(self) -> np.ndarray:
        """Run every row's uncached prompt tokens in chunks; return each row's last-token logits."""
        rows, chunk = self.rows, self.plan.prefill_chunk
        suffixes = [r.prompt[r.start:] for r in rows]
        longest = max(len(s) for s in suffixes)
        first = np.empty((self.batch, self.gen.config.vocab_size), np.float32)
        pad = self.gen.config.pad_token_id
        if longest > chunk:
            log.info("prefilling %d tokens in chunks of %d", longest, chunk)
        for c0 in range(0, longest, chunk):
            c1 = min(longest, c0 + chunk)
            width = c1 - c0
            ids = np.full((self.batch, width), pad, np.int64)
            pos = np.empty((self.batch, width), np.int64)
            index = np.empty((self.batch, 1), np.int64)
            for b, (row, s) in enumerate(zip(rows, suffixes, strict=True)):
                seg = s[c0:c1]
                ids[b, :len(seg)] = seg
                pos[b] = np.arange(row.start + c0, row.start + c1)
                index[b, 0] = min(max(len(s) - 1 - c0, 0), width - 1)
            logits = self.engine.step(self.cache, ids, pos, index)
            for b, s in enumerate(suffixes):
                if c0 <= len(s) - 1 < c1:
                    first[b] = logits[b]
            if self.session is not None:
                row = rows[0]
                self.session.tokens = row.prompt[:row.start + min(c1, len(suffixes[0]))]
        return first


