"""Continuous batching: one KV pool, one engine thread; sequences join and leave the running decode batch.

Why: a server that ran each request as its own :class:`~glm_runtime.generator.DecodeBatch` would queue every
request behind the ones decoding (or multiply the weight reads per token by running them side by side). Here
every decode step runs all active sequences at once, and a new request is prefilled between two decode steps
and then joins them, whatever the lengths of the others: the graph takes a position per row, writes K/V at
slot == position and admits slots ``<= position`` only (``docs/graph.md``), so rows at different lengths
share a step.

The pool: ``max_concurrency`` rows x ``cache_len`` slots, allocated by the engine. Active sequences are kept
packed in rows ``[0, n)``, so a decode step is one call on a contiguous view of ``n`` rows (no copy; see
:class:`glm_runtime.engine.RowEngine`). A sequence being prefilled sits in row ``n`` and is written through a
one-row view, in chunks. When a sequence ends, the last active row's valid slots are copied into its row.
Slots beyond a sequence's length may hold an earlier occupant's K/V: harmless, because each slot is written
before the mask ever admits it (finite values, times probability 0).

Memory: ``cache_len`` follows the longest admitted request (prompt + max_new_tokens, rounded to 64), grows
when a longer one is admitted and shrinks when it is over twice what the running ones need (ONNX Runtime's
attention costs the whole buffer length). The largest pool, ``max_concurrency x max_cache_len``, is checked
against the KV budget once at start (:func:`glm_runtime.engine.max_pool_cache_len`), so growth never exceeds
it; a request longer than ``max_cache_len`` is refused when submitted, and when every row and the bounded
queue are taken, :meth:`Scheduler.submit` raises :class:`QueueFullError` (HTTP 429) instead of queueing more.

Prefix caching (:mod:`glm_runtime.prefix_cache`): a sequence's K/V are kept in blocks after its prompt is
prefilled and when it ends; a new sequence whose prompt starts with held blocks gets them copied into its row
and prefills only the rest. Sequences of one :meth:`Scheduler.submit` with the same prompt (``n > 1``) share one
prefill: the first is prefilled, the others join with a copy of its row and of its last logits.

Policy per engine-loop iteration: drop cancelled sequences; prefill queued sequences FIFO, spending about one
``prefill_chunk`` of prompt tokens per iteration (so decoding rows wait for at most one chunk): short prompts
that arrived together are prefilled in one call on their adjacent free rows, a long one chunk by chunk through
a one-row view; then one decode step over all active rows. Each sequence has its own
:class:`~glm_runtime.sampling.Sampler` (batch 1): its settings and random stream are its own, so a seeded
request samples the same tokens whatever else is running.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from glm_runtime.engine import (
    CACHE_LEN_MULTIPLE,
    KVCache,
    KVPlan,
    RowEngine,
    default_budget_bytes,
    max_pool_cache_len,
    plan_pool,
    round_cache_len,
)
from glm_runtime.generator import DEFAULT_PREFILL_CHUNK, ContextLengthError
from glm_runtime.logprobs import token_logprobs
from glm_runtime.prefix_cache import PrefixCache, SlotEngine
from glm_runtime.sampling import Sampler
from glm_runtime.sequence import Listener, QueueFullError, SchedulerClosedError, Sequence, Stats

__all__ = ["Listener", "QueueFullError", "Scheduler", "SchedulerClosedError", "Sequence", "Stats"]

log = logging.getLogger(__name__)

#: Prompt positions per prefill call when every position's logits are wanted (prompt logprobs): their
#: ``[chunk, vocab]`` float32 logits are ~600 KB per position for GLM-4.
SCORE_CHUNK = 128


class Scheduler:
    """Owns the KV pool and the engine thread; :meth:`submit` from any thread."""

    def __init__(self, engine: RowEngine, *, max_concurrency: int = 8, max_queue: int = 32,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_budget_bytes: int | None = None,
                 max_cache_len: int | None = None, prefix_cache_bytes: int | None = None) -> None:
        """``prefix_cache_bytes``: ``None`` lets the prefix cache use what the KV budget leaves beside the pool
        (it shrinks as the pool grows), ``0`` turns it off, a number caps it further."""
        if not isinstance(engine, RowEngine):
            raise TypeError(f"{type(engine).__name__} cannot run row views (rows / copy_rows): it cannot batch "
                            f"continuously")
        if max_concurrency < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"need max_concurrency >= 1, max_queue >= 0, prefill_chunk >= 1; got "
                             f"{max_concurrency}, {max_queue}, {prefill_chunk}")
        self.engine = engine
        self.config = engine.config
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        budget = kv_budget_bytes if kv_budget_bytes is not None else default_budget_bytes(engine)
        #: The largest pool (every request admitted fits in it); raises MemoryBudgetError if none fits.
        self.plan: KVPlan = max_pool_cache_len(self.config, engine.cache_dtype, max_concurrency, prefill_chunk,
                                               budget, max_cache_len)
        self.max_cache_len = self.plan.cache_len
        self.budget_bytes = budget
        self.requested_chunk = prefill_chunk
        #: The prefill chunk for the pool's current length: the largest pool may need a smaller one than a
        #: short pool (attention scratch grows with the cache length), so it is re-planned on every resize.
        self.prefill_chunk = self.plan.prefill_chunk
        log.info("KV pool at most: %s", self.plan.arithmetic())
        self.pool: KVCache | None = None
        self.stats = Stats()
        self._cv = threading.Condition()
        self._queue: deque[Sequence] = deque()
        self._active: list[Sequence] = []  # decoding, packed: _active[b].row == b
        self._prefilling: Sequence | None = None  # at row len(_active)
        self._admitted: list[Sequence] = []  # the last group taken from the queue
        self._inflight = 0  # submitted and not yet ended: running, being placed, or queued (under _cv)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._closed = False
        self.prefix_cap = prefix_cache_bytes
        self.prefix: PrefixCache | None = None
        if prefix_cache_bytes != 0:
            if isinstance(engine, SlotEngine):
                self.prefix = PrefixCache(engine, 0)
                self._set_prefix_capacity(CACHE_LEN_MULTIPLE)
            else:
                log.info("%s cannot copy K/V slots to host memory: no prefix caching", type(engine).__name__)
        self._thread = threading.Thread(target=self._loop, name="glm-engine", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------------------------
    def submit(self, *seqs: Sequence) -> list[Sequence]:
        """Queue ``seqs`` (all or none). Raises ``ValueError`` for a request that can never run,
        :class:`QueueFullError` when rows and queue are full, :class:`SchedulerClosedError` when closing."""
        cfg = self.config
        for s in seqs:
            if not s.prompt:
                raise ValueError("the prompt is empty: give at least one token")
            bad = [t for t in s.prompt if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
            if bad:
                raise ValueError(f"the prompt has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
            if not isinstance(s.max_new_tokens, int) or s.max_new_tokens < 1:
                raise ValueError(f"max_tokens must be a positive integer, got {s.max_new_tokens!r}")
            if s.prompt_logprobs is not None and not hasattr(self.engine, "step_all"):
                raise ValueError(f"prompt logprobs (echo with logprobs) need logits at every prompt position, which "
                                 f"{type(self.engine).__name__} does not return; use the ONNX Runtime engine")
            if s.needed > self.max_cache_len:
                raise ContextLengthError(
                    f"prompt ({len(s.prompt)} tokens) + max_tokens ({s.max_new_tokens}) = {s.needed} exceeds this "
                    f"server's context of {self.max_cache_len} tokens per sequence"
                    + (f" (the model's is {cfg.max_position}; the KV budget for {self.max_concurrency} concurrent "
                       f"sequences limits it)" if self.max_cache_len < cfg.max_position else "")
                    + ": shorten the prompt or lower max_tokens")
        with self._cv:
            if self._closed:
                raise SchedulerClosedError("the server is shutting down")
            # Counted, not read off the lists: a group the engine thread has taken from the queue but not yet placed
            # in its rows is in neither list for the length of a prefill step (a 6th request slipped past a full
            # server then), and a long prompt's followers wait outside both.
            if self._inflight + len(seqs) > self.max_concurrency + self.max_queue:
                self.stats.rejected += len(seqs)
                raise QueueFullError(
                    f"all {self.max_concurrency} sequence slots are busy and {len(self._queue)} requests are "
                    f"waiting (queue bound {self.max_queue}): retry later")
            now = time.perf_counter()
            leaders: dict[tuple[int, ...], Sequence] = {}
            for s in seqs:
                s.t_submit = now
                s.sampler = Sampler(s.params, 1, cfg.vocab_size)
                s.sampler.observe(0, s.prompt)
                lead = leaders.get(key := tuple(s.prompt))
                if lead is not None and lead.max_new_tokens == s.max_new_tokens \
                        and 1 + len(lead.followers) < self.max_concurrency:
                    lead.followers.append(s)  # n > 1: one prefill for all
                    s.leader = lead
                else:
                    leaders[key] = s
                    self._queue.append(s)
            self.stats.submitted += len(seqs)
            self._inflight += len(seqs)
            self._cv.notify_all()
        return list(seqs)

    def cancel(self, seq: Sequence) -> None:
        """End ``seq`` (a client went away): a queued one at once, a running one before the next step."""
        with self._cv:
            if seq.finish_reason is not None:
                return
            seq.cancel_requested = True
            lead = seq.leader
            if lead is not None and seq in lead.followers:  # not yet joined: ends now
                lead.followers.remove(seq)
                queued = True
            elif seq in self._queue:
                i = self._queue.index(seq)
                del self._queue[i]
                if seq.followers:  # its siblings still want the prompt: the first becomes their leader
                    new, *rest = seq.followers
                    new.leader, new.followers, seq.followers = None, rest, []
                    for f in rest:
                        f.leader = new
                    self._queue.insert(i, new)
                queued = True
            else:
                queued = False
                self._cv.notify_all()
        if queued:
            self._end(seq, "cancelled")

    def close(self, timeout: float = 10.0) -> None:
        """Stop: refuse new sequences, cancel queued and running ones, join the engine thread."""
        with self._cv:
            self._closed = True
            queued = [f for q in self._queue for f in (q, *q.followers)]
            self._queue = deque()
            for s in [*self._active, *([self._prefilling] if self._prefilling else [])]:
                s.cancel_requested = True
            self._cv.notify_all()
        for s in queued:
            self._end(s, "cancelled")
        self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        """Gauges for ``/metrics`` and ``/health``."""
        with self._cv:
            pool = self.pool
            return {"running": len(self._active) + (self._prefilling is not None), "queued": len(self._queue),
                    "max_concurrency": self.max_concurrency, "max_queue": self.max_queue,
                    "cache_len": pool.cache_len if pool is not None else 0,
                    "max_cache_len": self.max_cache_len,
                    "kv_bytes": pool.nbytes if pool is not None else 0, "kv_budget_bytes": self.plan.budget_bytes,
                    "kv_max_bytes": self.plan.total_bytes, "alive": self._thread.is_alive(),
                    "prefix": dataclasses.replace(self.prefix.stats) if self.prefix is not None else None}

    # ---- the engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._queue or self._active or self._prefilling):
                    if self._closed:
                        return
                    if self.pool is not None and self.pool.cache_len > CACHE_LEN_MULTIPLE:
                        break  # idle: give the memory back first
                    self._cv.wait()
            try:
                self._iteration()
            except Exception as e:  # an engine failure ends the running sequences, not the server
                log.exception("engine step failed")
                self.stats.engine_errors += 1
                for s in [*self._running(), *self._admitted]:  # none may be left waiting forever
                    if not s.done.is_set():
                        s.error = f"the engine failed: {e}"
                        self._end(s, "error")
                self._active, self._prefilling, self._admitted = [], None, []

    def _iteration(self) -> None:
        for s in sorted((s for s in self._running() if s.cancel_requested), key=lambda s: -s.row):
            self._remove(s, "cancelled")
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefilling is not None:
                budget -= self._prefill(self._prefilling)
                continue
            group = self._admit(budget)
            if not group:
                break
            if len(group) == 1 and (len(group[0].prompt) - group[0].prefilled > self.prefill_chunk
                                    or group[0].prompt_logprobs is not None):
                self._prefilling = group[0]  # a long prompt: chunk by chunk, one row
                budget -= self._prefill(group[0])
            else:
                budget -= self._prefill_group(group)
        if self._active:
            self._decode()
        self._maybe_shrink()

    def _running(self) -> list[Sequence]:
        return [*self._active, *([self._prefilling] if self._prefilling else [])]

    def _admit(self, budget: int) -> list[Sequence]:
        """Take waiting sequences for the next free rows: the head always (when a row is free), then more short
        ones while the group, padded to its longest prompt, stays within ``budget`` prompt tokens."""
        with self._cv:
            free = self.max_concurrency - len(self._active)
            if not self._queue or free < 1:
                return []
            if 1 + len(self._queue[0].followers) > free:
                return []  # n > 1 siblings join together: wait for their rows
            group = [self._queue.popleft()]
            rows = 1 + len(group[0].followers)
            width = self._remaining(group[0])
            # Each row of a group writes the group's padded width of slots from its own cached offset, so the
            # rows need cache_len >= (largest offset) + width: a row with a long cached prefix and a short rest
            # beside one with a long rest would otherwise write past the pool (TensorScatter refuses it).
            offset = group[0].cached
            while (self._queue and rows + 1 + len(self._queue[0].followers) <= free and width <= self.prefill_chunk
                   and group[0].prompt_logprobs is None and self._queue[0].prompt_logprobs is None):
                grown = max(width, self._remaining(self._queue[0]))
                reach = max(offset, self._queue[0].cached) + grown
                if (len(group) + 1) * grown > budget or reach > self.max_cache_len:
                    break
                group.append(self._queue.popleft())
                rows += 1 + len(group[-1].followers)
                width, offset = grown, max(offset, group[-1].cached)
        # Out of the queue, not yet in a row: the error path must still end them.
        self._admitted = [f for s in group for f in (s, *s.followers)]
        needed = max(max(s.needed for s in [*self._active, *group]), offset + width if len(group) > 1 else 0)
        if self.pool is None:
            self.pool = self.engine.allocate(self.max_concurrency, round_cache_len(needed, self.max_cache_len))
            self._replan()
        elif needed > self.pool.cache_len:
            self._resize(round_cache_len(needed, self.max_cache_len))
        now = time.perf_counter()
        for i, seq in enumerate(group):
            seq.row = len(self._active) + i
            self.stats.queue_seconds_sum += now - seq.t_submit
            if self.prefix is not None:
                self.prefix.stats.lookups += 1
                if seq.cached:
                    seq.prefilled = self.prefix.load(self.pool, seq.row, seq.chain, seq.cached)
                    self.prefix.stats.hits += 1
                    self.prefix.stats.hit_tokens += seq.prefilled
                seq.chain = []
        return group

    def _remaining(self, seq: Sequence) -> int:
        """Prompt tokens ``seq`` must prefill: those after the longest prefix the cache holds (at least one, whose
        logits give the first token). Looked up again each time: blocks may have come or gone."""
        if self.prefix is None or seq.prompt_logprobs is not None:
            return len(seq.prompt)
        seq.chain = self.prefix.match(seq.prompt)
        seq.cached = min(len(seq.chain) * self.prefix.block_tokens, len(seq.prompt) - 1)
        return len(seq.prompt) - seq.cached

    def _store(self, seq: Sequence, tokens: list[int]) -> None:
        """Keep the K/V of ``seq``'s row (``seq.length`` valid slots of ``tokens``) for later prompts."""
        if self.prefix is not None and self.pool is not None and seq.finish_reason != "error":
            self.prefix.store(self.pool, seq.row, tokens, seq.length)

    def _set_prefix_capacity(self, cache_len: int) -> None:
        """What the KV budget leaves beside a pool of ``cache_len`` slots (its KV, scratch and resize buffer)."""
        if self.prefix is None:
            return
        pool = plan_pool(self.config, self.engine.cache_dtype, self.max_concurrency, cache_len, self.requested_chunk,
                         self.budget_bytes)
        room = self.budget_bytes - pool.total_bytes
        self.prefix.set_capacity(room if self.prefix_cap is None else min(room, self.prefix_cap))

    def _resize(self, cache_len: int) -> None:
        assert self.pool is not None
        keep = max((s.length for s in self._running()), default=0)
        log.debug("KV pool %d -> %d slots (keeping %d)", self.pool.cache_len, cache_len, keep)
        self.engine.resize(self.pool, cache_len, keep=keep)
        self.stats.resizes += 1
        self._replan()

    def _replan(self) -> None:
        assert self.pool is not None
        self.prefill_chunk = plan_pool(self.config, self.engine.cache_dtype, self.max_concurrency,
                                       self.pool.cache_len, self.requested_chunk, self.budget_bytes).prefill_chunk
        self._set_prefix_capacity(self.pool.cache_len)

    def _maybe_shrink(self) -> None:
        if self.pool is None:
            return
        target = round_cache_len(max((s.needed for s in self._running()), default=1), self.max_cache_len)
        if 2 * target <= self.pool.cache_len:
            self._resize(target)

    def _prefill(self, seq: Sequence) -> int:
        """One prefill chunk of ``seq`` through a one-row view; the last one samples its first token."""
        assert self.pool is not None
        view = self.engine.rows(self.pool, seq.row, seq.row + 1)
        c0 = seq.prefilled
        scoring = seq.prompt_logprobs is not None
        c1 = min(len(seq.prompt), c0 + (min(self.prefill_chunk, SCORE_CHUNK) if scoring else self.prefill_chunk))
        ids = np.asarray([seq.prompt[c0:c1]], np.int64)
        pos = np.arange(c0, c1, dtype=np.int64)[None]
        if scoring:  # logits at every position: position t scores prompt token t + 1
            every = self.engine.step_all(view, ids, pos)[0]  # type: ignore[attr-defined]
            scored = min(c1, len(seq.prompt) - 1) - c0
            seq.prompt_logprob_values += token_logprobs(every[:scored], seq.prompt[c0 + 1:c0 + 1 + scored],
                                                        seq.prompt_logprobs or 0)
            logits = every[-1:]
        else:
            index = np.asarray([[c1 - c0 - 1]], np.int64)
            logits = self.engine.step(view, ids, pos, index)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += c1 - c0
        seq.prefilled = c1
        if c1 == len(seq.prompt):
            self._prefilling = None
            assert seq.row == len(self._active)
            self.stats.prompt_tokens += len(seq.prompt)
            self._active.append(seq)
            self._store(seq, seq.prompt)
            first = logits[0:1].copy() if seq.followers else None
            done = [seq] if self._accept(seq, logits[0:1]) else []
            if first is not None:
                done += self._join_followers(seq, first)
            for s in sorted(done, key=lambda s: -s.row):
                self._remove(s, None)
        return c1 - c0

    def _prefill_group(self, group: list[Sequence]) -> int:
        """Prefill short prompts together in one call on rows ``[n, n + k)`` (right-padded: a padded tail writes
        slots its row overwrites before the mask admits them); each row's logits come from its last prompt token.
        They join the decode batch together, so the rows stay packed."""
        assert self.pool is not None
        n, k = len(self._active), len(group)
        width = max(len(s.prompt) - s.prefilled for s in group)
        ids = np.full((k, width), self.config.pad_token_id, np.int64)
        pos = np.empty((k, width), np.int64)
        last = self.pool.cache_len - 1
        for b, seq in enumerate(group):  # a row with a cached prefix starts after it
            ids[b, :len(seq.prompt) - seq.prefilled] = seq.prompt[seq.prefilled:]
            # Padding positions past the pool's end are clipped to its last slot: beyond the row's prompt, so
            # written before the mask ever admits it.
            np.minimum(np.arange(seq.prefilled, seq.prefilled + width), last, out=pos[b])
        index = np.asarray([[len(s.prompt) - s.prefilled - 1] for s in group], np.int64)
        logits = self.engine.step(self.engine.rows(self.pool, n, n + k), ids, pos, index)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += sum(len(s.prompt) - s.prefilled for s in group)
        finished, leaders = [], []
        for b, seq in enumerate(group):
            seq.prefilled = len(seq.prompt)
            self.stats.prompt_tokens += len(seq.prompt)
            self._active.append(seq)
            self._store(seq, seq.prompt)
            if seq.followers:
                leaders.append((seq, logits[b:b + 1].copy()))
            if self._accept(seq, logits[b:b + 1]):
                finished.append(seq)
        for seq, first in leaders:  # after every leader: the leaders' rows are the ones the step wrote
            finished += self._join_followers(seq, first)
        for seq in sorted(finished, key=lambda s: -s.row):
            self._remove(seq, None)
        return k * width

    def _join_followers(self, leader: Sequence, logits: np.ndarray) -> list[Sequence]:
        """``leader``'s same-prompt siblings join the decode batch with a copy of its prompt's K/V and of the
        logits its prefill ended with (each samples its own first token); returns those already finished."""
        assert self.pool is not None
        finished = []
        for f in leader.followers:
            f.row = len(self._active)
            self.engine.copy_rows(self.pool, leader.row, f.row, len(f.prompt))
            f.prefilled, f.cached, f.shared = len(f.prompt), leader.cached, True
            f.prompt_logprob_values = leader.prompt_logprob_values
            self.stats.prompt_tokens += len(f.prompt)
            self.stats.shared_prefill_tokens += len(f.prompt)
            self._active.append(f)
            if self._accept(f, logits.copy()):
                finished.append(f)
        leader.followers = []
        return finished

    def _decode(self) -> None:
        assert self.pool is not None
        n = len(self._active)
        arrays = self._arrays.get(n)
        if arrays is None:  # allocated once per batch size: the engine binds them once
            arrays = self._arrays[n] = (np.zeros((n, 1), np.int64), np.zeros((n, 1), np.int64),
                                        np.zeros((n, 1), np.int64))
        ids, pos, index = arrays
        for b, s in enumerate(self._active):
            ids[b, 0], pos[b, 0] = s.output[-1], s.length
        logits = self.engine.step(self.engine.rows(self.pool, 0, n), ids, pos, index)
        self.stats.decode_steps += 1
        self.stats.decode_rows += n
        finished = [s for b, s in enumerate(list(self._active)) if self._accept(s, logits[b:b + 1])]
        for s in sorted(finished, key=lambda s: -s.row):
            self._remove(s, None)

    def _accept(self, seq: Sequence, logits: np.ndarray) -> bool:
        """Sample ``seq``'s next token, tell its listener; ``True`` when the sequence has ended."""
        assert seq.sampler is not None
        raw = logits[0].copy() if seq.logprobs is not None else None  # the sampler changes logits in place
        if seq.constraint is not None:
            t0 = time.perf_counter()
            ok = seq.constraint.apply(logits[0])
            self.stats.grammar_seconds += time.perf_counter() - t0
            self.stats.grammar_tokens += 1
            if not ok:
                seq.error = f"the grammar allows no token here: {seq.constraint.error or 'dead end'}"
                seq.finish_reason = "error"
                return True
        tok = int(seq.sampler(logits)[0])
        if raw is not None:
            seq.output_logprobs += token_logprobs(raw[None], [tok], seq.logprobs or 0)
        seq.sampler.observe(0, (tok,))
        seq.output.append(tok)
        self.stats.generated_tokens += 1
        if seq.t_first_token is None:
            seq.t_first_token = time.perf_counter()
            self.stats.ttft_seconds_sum += seq.t_first_token - seq.t_submit
            self.stats.ttft_count += 1
        if seq.constraint is not None:
            if not seq.constraint.consume(tok):  # cannot happen for a token the mask allowed
                log.warning("grammar refused its own token %d: %s", tok, seq.constraint.error)
        if tok in seq.stop_ids or (seq.constraint is not None and seq.constraint.done):
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        if seq.listener is not None:
            try:
                if seq.listener.on_token(seq, tok) and seq.finish_reason is None:
                    seq.finish_reason = "stop"
            except Exception as e:  # a broken listener ends its own sequence only
                log.exception("listener failed")
                seq.error = f"{type(e).__name__}: {e}"
                seq.finish_reason = "error"
        return seq.finish_reason is not None

    def _remove(self, seq: Sequence, reason: str | None) -> None:
        """Free ``seq``'s row (its K/V kept by the prefix cache first), keeping the active rows packed."""
        assert self.pool is not None
        if reason != "error":
            self._store(seq, [*seq.prompt, *seq.output])
        if seq is self._prefilling:
            self._prefilling = None
        else:
            k, last = seq.row, len(self._active) - 1
            assert self._active[k] is seq
            if k != last:  # the last active row moves into the hole
                mover = self._active[last]
                self.engine.copy_rows(self.pool, last, k, mover.length)
                self._active[k], mover.row = mover, k
            self._active.pop()
            p = self._prefilling
            if p is not None:  # the row being prefilled moves down next to the active ones
                self.engine.copy_rows(self.pool, p.row, last, p.prefilled)
                p.row = last
        seq.row = -1
        self._end(seq, reason or seq.finish_reason or "stop")

    def _end(self, seq: Sequence, reason: str) -> None:
        if seq.done.is_set():
            return
        with self._cv:
            self._inflight -= 1
        if seq.finish_reason is None:
            seq.finish_reason = reason
        seq.t_end = time.perf_counter()
        self.stats.finished[seq.finish_reason] = self.stats.finished.get(seq.finish_reason, 0) + 1
        seq.done.set()
        if seq.listener is not None:
            try:
                seq.listener.on_finish(seq)
            except Exception:
                log.exception("listener failed")

