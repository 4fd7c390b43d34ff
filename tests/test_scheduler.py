"""Continuous batching on the tiny artifact: sequences that share decode steps (joining and leaving at any time,
prefilled in chunks between steps) give exactly the tokens each gives alone through the plain decode loop
(``LLM.generate``, one request, its own cache), and the pool's limits hold."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from glm_runtime import LLM, load
from glm_runtime.engine import MemoryBudgetError, RowEngine
from glm_runtime.generator import ContextLengthError
from glm_runtime.sampling import SamplingParams
from glm_runtime.scheduler import QueueFullError, Scheduler, Sequence

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llm(tiny_artifact: Path) -> LLM:
    return load(tiny_artifact, threads=2, verify="none")


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 151000, n).tolist()


def alone(llm: LLM, p: list[int], n: int, stop_ids: tuple[int, ...] = (), **kw) -> list[int]:
    """The reference: the request run by itself through the existing decode loop."""
    kw.setdefault("temperature", 0)
    return llm.generate(prompt_ids=p, max_new_tokens=n, stop_token_ids=stop_ids, **kw).output_ids


def test_row_views_share_the_pool_memory(llm: LLM) -> None:
    engine = llm.engine
    assert isinstance(engine, RowEngine)
    pool = engine.allocate(4, 64)
    view = engine.rows(pool, 1, 3)
    row_bytes = pool.nbytes // len(pool.addresses()) // 4
    assert [a - b for a, b in zip(view.addresses(), pool.addresses(), strict=True)] == [row_bytes] * len(
        view.addresses())
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    engine.step(view, ids, np.tile(np.arange(3), (2, 1)), np.array([[2], [2]]))
    k = pool.arrays[0]
    assert k[1:3, :, :3].any() and not k[0].any() and not k[3].any()  # written through the view, in place
    engine.copy_rows(pool, 2, 0, 3)
    np.testing.assert_array_equal(k[0, :, :3], k[2, :, :3])
    assert engine.rows(pool, 1, 3) is view
    engine.resize(pool, 128, keep=3)
    assert engine.rows(pool, 1, 3) is not view  # a resize invalidates views


def test_resize_holds_one_extra_buffer_not_a_second_cache(llm: LLM) -> None:
    import tracemalloc

    engine = llm.engine
    tracemalloc.start()  # before allocating: freeing the old buffers must count
    try:
        pool = engine.allocate(8, 1024)
        buffers = len(pool.addresses())
        one = pool.nbytes // buffers
        for array in pool.arrays:
            array.fill(1)  # resident, as a used pool is
        del array  # the test must not keep an old buffer alive itself
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        engine.resize(pool, 2048, keep=1000)
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = 2 * one * buffers - one * buffers  # the cache doubled: net growth of one old cache
    assert now - base == pytest.approx(grown, rel=0.01)
    assert peak - base <= grown + one + 1024 * 1024  # at most one old buffer alive beside the new ones
    assert all((a[:, :, :1000] == 1).all() and not a[:, :, 1000:].any() for a in pool.arrays)


@pytest.mark.parametrize("chunk", [8, 128])  # long prompts chunked one row at a time / short ones grouped
def test_concurrent_greedy_equals_each_request_alone(llm: LLM, chunk: int) -> None:
    # Different prompt lengths (some longer than the prefill chunk), different lengths to generate; more
    # requests than rows, so some queue and join the running batch as others leave.
    specs = [(prompt(5, 1), 30), (prompt(23, 2), 9), (prompt(11, 3), 40), (prompt(37, 4), 17),
             (prompt(2, 5), 25), (prompt(70, 6), 12)]
    expected = [alone(llm, p, n) for p, n in specs]
    # A stop id that ends row 2 early, so rows leave mid-batch and the last row moves into the hole.
    stop = (expected[2][6],)
    expected_stop = [alone(llm, p, n, stop) for p, n in specs]
    assert any(len(e) < n for e, (_, n) in zip(expected_stop, specs, strict=True))
    sched = Scheduler(llm.engine, max_concurrency=3, max_queue=8, prefill_chunk=chunk, kv_budget_bytes=1 << 30)
    try:
        seqs = sched.submit(*(Sequence(p, n, GREEDY, frozenset(stop)) for p, n in specs))
        assert all(s.wait(60) for s in seqs)
        assert [s.output for s in seqs] == expected_stop
        assert sched.stats.decode_rows > sched.stats.decode_steps  # steps really ran several rows at once
        if chunk == 128:  # the first three arrived together and were prefilled in one call
            assert sched.stats.prefill_calls < len(specs)
        # Late arrivals: submitted from inside the running batch (a listener), at various points.
        late: list[Sequence] = []

        class Spawner:
            def on_token(self, seq: Sequence, token: int) -> bool:
                if len(seq.output) in (3, 8):
                    p, n = specs[len(late) + 3]
                    late.extend(sched.submit(Sequence(p, n, GREEDY)))
                return False

            def on_finish(self, seq: Sequence) -> None:
                pass

        (first,) = sched.submit(Sequence(specs[0][0], specs[0][1], GREEDY, listener=Spawner()))
        assert first.wait(60) and len(late) == 2 and all(s.wait(60) for s in late)
        assert [first.output, *(s.output for s in late)] == [expected[0], expected[3], expected[4]]
    finally:
        sched.close()


def test_seeded_sampling_under_concurrency_equals_alone(llm: LLM) -> None:
    kw = {"temperature": 0.9, "top_p": 0.9, "top_k": 40}
    specs = [(prompt(7, 11), 20, 3), (prompt(19, 12), 14, 4), (prompt(3, 13), 20, 3)]
    expected = [alone(llm, p, n, seed=seed, **kw) for p, n, seed in specs]
    sched = Scheduler(llm.engine, max_concurrency=3, kv_budget_bytes=1 << 30)
    try:
        seqs = sched.submit(*(Sequence(p, n, SamplingParams(seed=seed, **kw)) for p, n, seed in specs))
        assert all(s.wait(60) for s in seqs)
        assert [s.output for s in seqs] == expected
        assert expected[0] != expected[2]  # different prompts, same seed: not one shared stream
    finally:
        sched.close()


def test_cancel_frees_the_row_and_the_queue_is_bounded(llm: LLM) -> None:
    sched = Scheduler(llm.engine, max_concurrency=1, max_queue=1, kv_budget_bytes=1 << 30)
    try:
        started = threading.Event()

        class Signal:
            def on_token(self, seq: Sequence, token: int) -> bool:
                started.set()
                time.sleep(0.002)  # keep it running while the test acts
                return False

            def on_finish(self, seq: Sequence) -> None:
                pass

        (long,) = sched.submit(Sequence(prompt(4, 1), 4000, GREEDY, listener=Signal()))
        assert started.wait(30)
        (queued,) = sched.submit(Sequence(prompt(4, 2), 5, GREEDY))
        with pytest.raises(QueueFullError, match="retry later"):
            sched.submit(Sequence(prompt(4, 3), 5, GREEDY))
        assert sched.stats.rejected == 1
        sched.cancel(long)
        assert queued.wait(30), "the cancelled sequence's row was not freed"
        assert long.finish_reason == "cancelled" and len(long.output) < 4000
        assert queued.output == alone(llm, prompt(4, 2), 5)
        snap = sched.snapshot()
        assert snap["running"] == 0 and snap["queued"] == 0
    finally:
        sched.close()


def test_a_sequence_being_placed_still_holds_its_row(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the engine thread prefills a sequence it has taken from the queue (in neither the queue nor the
    active rows for that step), a full scheduler still refuses the next one: a 6th request once slipped past a
    server of 3 rows + 2 queue places in that window (tests/test_server.py, CI)."""
    entered, release = threading.Event(), threading.Event()
    step = llm.engine.step

    def held_step(*args: object, **kwargs: object) -> object:
        entered.set()
        assert release.wait(30)
        return step(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", held_step)
    sched = Scheduler(llm.engine, max_concurrency=1, max_queue=0, kv_budget_bytes=1 << 30)
    try:
        (first,) = sched.submit(Sequence(prompt(4, 1), 3, GREEDY))
        assert entered.wait(30)  # its prefill step has begun: out of the queue, not yet in a row
        with pytest.raises(QueueFullError, match="retry later"):
            sched.submit(Sequence(prompt(4, 2), 3, GREEDY))
        release.set()
        assert first.wait(30) and first.finish_reason == "length"
        (second,) = sched.submit(Sequence(prompt(4, 2), 3, GREEDY))  # its row is free again
        assert second.wait(30) and len(second.output) == 3
    finally:
        release.set()
        sched.close()


def test_pool_grows_shrinks_and_respects_the_budget(llm: LLM) -> None:
    cfg = llm.config
    per_token = cfg.kv_cache_bytes_per_token(llm.engine.cache_dtype)
    budget = 4 * 1024 * per_token  # room for 4 rows of about 1K slots (less scratch)
    sched = Scheduler(llm.engine, max_concurrency=4, kv_budget_bytes=budget)
    try:
        assert sched.plan.total_bytes <= budget and 512 <= sched.max_cache_len < 1024
        assert sched.max_cache_len % 64 == 0
        with pytest.raises(ContextLengthError, match="KV budget"):
            sched.submit(Sequence(prompt(10, 1), sched.max_cache_len))
        (short,) = sched.submit(Sequence(prompt(10, 1), 20))
        assert short.wait(30) and sched.pool.cache_len == 64
        (longer,) = sched.submit(Sequence(prompt(100, 2), 200))
        assert longer.wait(60)
        assert longer.output == alone(llm, prompt(100, 2), 200)
        deadline = time.monotonic() + 10
        while sched.pool.cache_len != 64 and time.monotonic() < deadline:  # idle: shrinks back
            time.sleep(0.01)
        assert sched.pool.cache_len == 64 and sched.stats.resizes >= 2
    finally:
        sched.close()
    with pytest.raises(MemoryBudgetError, match="max-concurrency"):
        Scheduler(llm.engine, max_concurrency=64, kv_budget_bytes=per_token * 64)


def test_bad_sequences_are_refused_before_queueing(llm: LLM) -> None:
    sched = Scheduler(llm.engine, max_concurrency=1, kv_budget_bytes=1 << 30)
    try:
        for seq, message in [(Sequence([], 3), "empty"), (Sequence([1, 10**7], 3), "outside the vocabulary"),
                             (Sequence([1], 0), "positive")]:
            with pytest.raises(ValueError, match=message):
                sched.submit(seq)
        assert sched.stats.submitted == 0
    finally:
        sched.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        sched.submit(Sequence([1], 1))


def test_an_engine_failure_ends_the_running_sequences_not_the_scheduler(llm: LLM) -> None:
    class Flaky:
        """The real engine, except that ``step`` raises while ``broken``."""

        def __init__(self, engine) -> None:
            self.engine, self.broken = engine, False

        def __getattr__(self, name: str):
            return getattr(self.engine, name)

        def step(self, *args):
            if self.broken:
                raise RuntimeError("device lost")
            return self.engine.step(*args)

    flaky = Flaky(llm.engine)
    for name in ("config", "cache_dtype"):
        setattr(flaky, name, getattr(llm.engine, name))
    flaky.run_seconds = 0.0
    sched = Scheduler(flaky, max_concurrency=2, kv_budget_bytes=1 << 30)
    try:
        flaky.broken = True
        seqs = sched.submit(Sequence(prompt(4, 1), 5), Sequence(prompt(6, 2), 5), Sequence(prompt(3, 3), 5))
        assert all(s.wait(30) for s in seqs)
        assert {s.finish_reason for s in seqs} == {"error"} and "device lost" in seqs[0].error
        flaky.broken = False
        (ok,) = sched.submit(Sequence(prompt(4, 1), 5))
        assert ok.wait(30) and ok.output == alone(llm, prompt(4, 1), 5)
        assert sched.stats.engine_errors >= 1
    finally:
        sched.close()
