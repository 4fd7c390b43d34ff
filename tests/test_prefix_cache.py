"""Automatic prefix caching and shared prefill (n > 1) in the scheduler, on the tiny artifact: a request whose
prompt starts with tokens an earlier request ran prefills only the rest, and gives exactly the tokens it gives
without the cache (and alone, through the plain decode loop); the block store stays under its capacity, least
recently used first out."""

from __future__ import annotations

import numpy as np
import pytest

from glm_runtime import LLM
from glm_runtime.prefix_cache import BLOCK_TOKENS, PrefixCache
from glm_runtime.sampling import SamplingParams
from glm_runtime.scheduler import Scheduler, Sequence
from tests import test_scheduler
from tests.test_scheduler import GREEDY, alone, prompt

llm = test_scheduler.llm  # the same module-scoped fixture: the tiny artifact, loaded once per module


def run(sched: Scheduler, *seqs: Sequence) -> list[list[int]]:
    sched.submit(*seqs)
    assert all(s.wait(60) for s in seqs)
    return [s.output for s in seqs]


def conversation(sched: Scheduler, turns: int, chunk_seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """A multi-turn chat in token ids: each turn's prompt is the previous prompt + answer + a new message."""
    history: list[int] = []
    outputs, cached = [], []
    for t in range(turns):
        history = history + prompt(9 + 7 * t, 100 * chunk_seed + t)
        (seq,) = sched.submit(Sequence(list(history), 12, GREEDY))
        assert seq.wait(60)
        outputs.append(seq.output)
        cached.append(seq.cached)
        history = history + seq.output
    return outputs, cached


@pytest.mark.parametrize("chunk", [8, 512])  # chunked one row at a time / grouped prefill
def test_multi_turn_greedy_with_cache_equals_without(llm: LLM, chunk: int) -> None:
    kw = {"max_concurrency": 2, "prefill_chunk": chunk, "kv_budget_bytes": 1 << 30}
    off = Scheduler(llm.engine, prefix_cache_bytes=0, **kw)
    on = Scheduler(llm.engine, **kw)
    try:
        expected, none = conversation(off, 5)
        got, cached = conversation(on, 5)
        assert off.prefix is None and none == [0] * 5
        assert got == expected
        # Turn 1 has nothing to reuse; every later turn reuses the whole blocks of the conversation so far.
        assert cached[0] == 0 and all(c >= BLOCK_TOKENS for c in cached[1:])
        st = on.prefix.stats
        assert st.hits == 4 and st.lookups == 5 and st.hit_tokens == sum(cached)
        assert on.stats.prefill_tokens == on.stats.prompt_tokens - sum(cached)
        assert 0 < st.bytes <= st.capacity_bytes
        # The last turn alone, through the plain decode loop, from scratch.
        history = [t for turn in range(5) for t in prompt(9 + 7 * turn, turn) + got[turn]][:-len(got[4])]
        assert alone(llm, history, 12) == got[4]
    finally:
        off.close()
        on.close()


def test_a_shared_prefix_serves_concurrent_requests_exactly(llm: LLM) -> None:
    system = prompt(40, 7)  # a "system prompt" many requests start with
    specs = [(system + prompt(5 + 3 * i, 20 + i), 10 + i) for i in range(4)]
    expected = [alone(llm, p, n) for p, n in specs]
    sched = Scheduler(llm.engine, max_concurrency=4, kv_budget_bytes=1 << 30)
    try:
        assert run(sched, Sequence([*system, 1, 2, 3], 4, GREEDY))  # warms the cache with the system prompt
        seqs = [Sequence(p, n, GREEDY) for p, n in specs]
        assert run(sched, *seqs) == expected  # prefilled together, each row starting after its cached prefix
        assert all(s.cached == 32 for s in seqs)  # two whole blocks of the 40-token system prompt
    finally:
        sched.close()


def test_n_siblings_share_one_prefill_and_seeds_stay_reproducible(llm: LLM) -> None:
    p = prompt(30, 3)
    kw = {"temperature": 0.9, "top_p": 0.9, "top_k": 40}
    params = [SamplingParams(seed=5 + j, **kw) for j in range(3)]
    expected = [alone(llm, p, 15, seed=5 + j, **kw) for j in range(3)]
    for cache in (None, 0):
        sched = Scheduler(llm.engine, max_concurrency=4, kv_budget_bytes=1 << 30, prefix_cache_bytes=cache)
        try:
            seqs = [Sequence(p, 15, sp) for sp in params]
            assert run(sched, *seqs) == expected
            assert [s.shared for s in seqs] == [False, True, True]
            assert sched.stats.prefill_tokens == len(p) and sched.stats.shared_prefill_tokens == 2 * len(p)
            # Again, now with the prompt's blocks cached: same seeds, same tokens.
            assert run(sched, *(Sequence(p, 15, sp) for sp in params)) == expected
            greedy = [Sequence(p, 8, GREEDY) for _ in range(2)]
            assert run(sched, *greedy) == [alone(llm, p, 8)] * 2
        finally:
            sched.close()


def test_cancelling_a_queued_leader_keeps_its_siblings(llm: LLM) -> None:
    sched = Scheduler(llm.engine, max_concurrency=2, max_queue=4, kv_budget_bytes=1 << 30)
    try:
        (busy,) = sched.submit(Sequence(prompt(4, 1), 3000, GREEDY))
        lead, sib = sched.submit(Sequence(prompt(6, 2), 5, GREEDY), Sequence(prompt(6, 2), 5, GREEDY))
        assert sib.leader is lead
        sched.cancel(lead)
        sched.cancel(busy)
        assert sib.wait(30) and sib.output == alone(llm, prompt(6, 2), 5)
        assert lead.finish_reason == "cancelled"
    finally:
        sched.close()


class ArrayEngine:
    """The slot interface over a plain array ``[rows, 2 x layers, heads, slots, dim]``, for the block store."""

    def __init__(self) -> None:
        self.kv = np.zeros((2, 2, 1, 256, 4), np.float32)

    def read_slots(self, cache, row: int, start: int, stop: int) -> np.ndarray:
        return self.kv[row, :, :, start:stop].copy()

    def write_slots(self, cache, row: int, start: int, data: np.ndarray) -> None:
        self.kv[row, :, :, start:start + data.shape[2]] = data


def test_block_store_evicts_least_recently_used_leaves_first() -> None:
    eng = ArrayEngine()
    b = BLOCK_TOKENS
    block_bytes = 2 * 1 * b * 4 * 4
    cache = PrefixCache(eng, capacity_bytes=4 * block_bytes)
    a, c = list(range(3 * b)), [7] * b + list(range(100, 100 + 2 * b))
    eng.kv[0, :, :, :3 * b] = np.arange(3 * b, dtype=np.float32)[None, None, :, None]
    assert cache.store(None, 0, a, 3 * b + 5) == 3  # three whole blocks (the partial one is not kept)
    assert cache.store(None, 0, a, 3 * b) == 0  # held already
    assert len(cache.match([*a, 1, 2])) == 3 and len(cache.match([9, *a])) == 0
    cache.store(None, 0, c, 3 * b)  # needs 3 blocks: evicts a's least recent ones, leaves first
    st = cache.stats
    assert st.bytes <= 4 * block_bytes and st.blocks == 4 and st.evicted_blocks == 2
    assert len(cache.match(a)) == 1 and len(cache.match(c)) == 3  # a's root block survived, not an orphan
    eng.kv[1] = 0
    assert cache.load(None, 1, cache.match(a), 10) == 10
    np.testing.assert_array_equal(eng.kv[1, 0, 0, :10, 0], np.arange(10))
    cache.set_capacity(block_bytes)
    assert st.bytes <= block_bytes and len(cache.match(c)) <= 1


def test_grouped_rows_with_different_cached_offsets_fit_the_pool(llm: LLM) -> None:
    """A row with a long cached prefix and a short rest, prefilled in one call beside a fresh row with a long
    prompt: each row writes the group's padded width from its own offset, so the pool must reach the largest
    offset + width (found under Ray Serve's default router: TensorScatter refused 720 + 219 > 896)."""
    long = prompt(600, 11)
    sched = Scheduler(llm.engine, max_concurrency=2, prefill_chunk=512, kv_budget_bytes=1 << 30)
    try:
        assert run(sched, Sequence(long, 4, GREEDY))  # caches the long prompt's whole blocks; pool ~640 slots
        specs = [(long + prompt(8, 12), 4), (prompt(200, 13), 4)]
        seqs = [Sequence(p, n, GREEDY) for p, n in specs]
        assert run(sched, *seqs) == [alone(llm, p, n) for p, n in specs]
        assert seqs[0].cached >= 592 and seqs[1].cached == 0
        assert sched.stats.finished.get("error", 0) == 0
    finally:
        sched.close()
