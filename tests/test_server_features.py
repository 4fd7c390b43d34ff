"""Server features beyond plain generation (issue 17): prefix caching seen from HTTP (usage and ``/metrics``),
logprobs and echo, structured output, ``/tokenize`` and ``/detokenize``. Expected values come from the Python API
or a direct ONNX Runtime run, never from the server's own earlier output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from glm_runtime import LLM, load
from glm_runtime.scheduler import Scheduler
from tests.test_server import KEY, MODEL, client, running

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def llm(tiny_artifact: Path) -> LLM:
    return load(tiny_artifact, threads=2, verify="none")


@pytest.fixture(scope="module")
def served(llm: LLM) -> Iterator[tuple[str, Scheduler]]:
    sched = Scheduler(llm.engine, max_concurrency=3, max_queue=4, kv_budget_bytes=1 << 30)
    with running(llm, sched, api_key=KEY, max_tokens_limit=256) as base:
        yield base, sched


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_second_turn_reuses_the_first_and_metrics_say_so(served: tuple[str, Scheduler], llm: LLM) -> None:
    base, _ = served
    c = client(base)
    before = httpx.get(base + "/metrics", headers=AUTH).text
    messages = [{"role": "system", "content": "You answer briefly. " * 6}, {"role": "user", "content": "Hello!"}]
    first = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached < second.usage.prompt_tokens
    # The same answer as the plain decode loop from scratch.
    assert second.choices[0].message.content == llm.chat(messages, max_new_tokens=12, temperature=0).text
    after = httpx.get(base + "/metrics", headers=AUTH).text
    assert metric(after, "glm_prefix_cache_hits_total") - metric(before, "glm_prefix_cache_hits_total") >= 1
    saved = metric(after, "glm_prefix_cache_saved_tokens_total") - metric(before, "glm_prefix_cache_saved_tokens_total")
    assert saved >= cached
    assert 0 < metric(after, "glm_prefix_cache_hit_rate") <= 1
