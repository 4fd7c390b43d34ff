"""``glm_runtime.ray_app`` on a real local Ray instance (2 CPUs, 2 replicas of the tiny model), through Serve's HTTP
proxy and the official ``openai`` client.

Expected answers come from the single-process server (``create_app`` under uvicorn, as ``glm-runtime serve`` runs
it) given the same requests: Serve must add nothing and lose nothing. One Ray instance for the module (starting
Ray on 2 cores takes ~20 s); everything is shut down at the end.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from glm_runtime import LLM, load
from glm_runtime.scheduler import Scheduler
from tests.test_server import KEY, MODEL, WEATHER, client, running

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
ray_app = pytest.importorskip("glm_runtime.ray_app")

pytestmark = pytest.mark.slow

CONCURRENCY, QUEUE = 3, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_base(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serve's HTTP proxy in front of 2 replicas (affinity router), on a free loopback port."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    port = free_port()
    from glm_runtime.ray_proxy import CALLBACK

    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = CALLBACK  # as `glm-runtime serve --ray` does
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ray_app.ReplicaConfig(str(tiny_artifact), MODEL, str(key_file), max_concurrency=CONCURRENCY,
                                    max_queue=QUEUE, max_tokens_limit=256, max_body_bytes=100_000, threads=1,
                                    verify="none", kv_budget_gb=1.0)
        serve.run(ray_app.build(cfg, replicas=2, num_cpus=0.5, shutdown_timeout=5), name="glm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)


@pytest.fixture(scope="module")
def single_base(tiny_artifact: Path) -> Iterator[str]:
    llm: LLM = load(tiny_artifact, threads=1, verify="none")
    sched = Scheduler(llm.engine, max_concurrency=CONCURRENCY, max_queue=QUEUE, kv_budget_bytes=1 << 30)
    with running(llm, sched, api_key=KEY, max_body_bytes=100_000, max_tokens_limit=256) as base:
        yield base


def chat(base: str, stream: bool = False, **kw: Any) -> Any:
    return client(base).chat.completions.create(model=MODEL, temperature=0, stream=stream, **kw)


def streamed_text(chunks: Any) -> tuple[str, list[Any]]:
    chunks = list(chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_same_greedy_answers_as_the_single_process_server(ray_base: str, single_base: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the sea"}]
    ref, got = chat(single_base, messages=messages, max_tokens=24), chat(ray_base, messages=messages, max_tokens=24)
    assert got.choices[0].message.content == ref.choices[0].message.content != ""
    assert got.choices[0].finish_reason == ref.choices[0].finish_reason
    assert got.usage == ref.usage

    kw = dict(messages=messages, max_tokens=24, stream_options={"include_usage": True})
    (ref_text, ref_chunks), (text, chunks) = (streamed_text(chat(b, stream=True, **kw)) for b in (single_base,
                                                                                                     ray_base))
    assert text == ref_text == ref.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed via Serve
    assert chunks[-1].usage == ref_chunks[-1].usage

    # tools: offered, and a history with a call and its result (the prompt GLM-4's template builds from them)
    history = [{"role": "user", "content": "weather in Beijing?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    for tool_choice in ("auto", {"type": "function", "function": {"name": "get_weather"}}):
        a, b = (chat(base, messages=history, tools=WEATHER, tool_choice=tool_choice, max_tokens=16)
                for base in (single_base, ray_base))
        assert b.choices[0].message.model_dump() == a.choices[0].message.model_dump()
        assert b.choices[0].finish_reason == a.choices[0].finish_reason and b.usage == a.usage

    comp = dict(model=MODEL, prompt="the sea is", max_tokens=12, temperature=0)
    assert (client(ray_base).completions.create(**comp).choices[0].text
            == client(single_base).completions.create(**comp).choices[0].text)


def test_errors_auth_health_and_metrics_are_the_servers(ray_base: str, single_base: str) -> None:
    for base in (ray_base, single_base):
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong-key-000000").models.list()
    bad = {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
    hdr = {"Authorization": f"Bearer {KEY}"}
    a, b = (httpx.post(base + "/v1/chat/completions", json=bad, headers=hdr) for base in (single_base, ray_base))
    assert b.status_code == a.status_code == 404 and b.json() == a.json()
    assert httpx.get(ray_base + "/health").json()["status"] == "ok"
    metrics = httpx.get(ray_base + "/metrics", headers=hdr).text
    assert "glm_sequences_max 3" in metrics and "glm_generation_tokens_total" in metrics


def test_a_conversation_stays_on_one_replica(ray_base: str) -> None:
    def replica(session: str | None) -> str:
        headers = {"Authorization": f"Bearer {KEY}", **({"x-session-id": session} if session else {})}
        r = httpx.post(ray_base + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
        return r.headers["x-glm-replica"]

    for session in ("conv-a", "conv-b", "conv-c"):
        assert len({replica(session) for _ in range(4)}) == 1
    assert len({replica(None) for _ in range(12)}) == 2  # anonymous: least-loaded, ties spread


def test_killing_a_replica_under_load_loses_no_request(ray_base: str) -> None:
    """6 streaming clients; one replica's actor is killed mid-load. Every request must end within its timeout
    (lost = 0): completed, or failed with an OpenAI-style error naming the failed replica (a 503 body before the
    stream started, an error event in it after: ray_proxy.py), never a bare cut. Serve then starts a
    replacement replica."""
    counts: Counter[str] = Counter()
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def one_client(i: int) -> None:
        c = openai.OpenAI(base_url=ray_base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        n = 0
        while not stop.is_set():
            n += 1
            with lock:
                counts["sent"] += 1
            t0 = time.monotonic()
            try:
                stream = c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"client {i} turn {n}"}], max_tokens=160,
                    temperature=0, stream=True, extra_body={"ignore_eos": True},
                    extra_headers={"x-session-id": f"c{i}"})
                reasons = [ch.choices[0].finish_reason for ch in stream if ch.choices and ch.choices[0].finish_reason]
                outcome = "completed" if reasons == ["length"] else "failed"
                if outcome == "failed":
                    errors.append(f"stream ended with finish reasons {reasons}")
            except openai.APITimeoutError:
                outcome = "lost"  # hung until the client gave up
            except (openai.APIConnectionError, httpx.HTTPError) as e:  # cut without an error the client can read
                outcome = "failed"
                errors.append(f"unclear {type(e).__name__}: {e}"[:300])
            except openai.APIError as e:  # an OpenAI-style error body or stream event
                outcome = "failed"
                errors.append(f"{type(e).__name__}: {e}"[:300])
            if time.monotonic() - t0 > 55:
                outcome = "lost"
            with lock:
                counts[outcome] += 1

    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(4)
    victim = httpx.get(ray_base + "/health").headers["x-glm-replica"]
    actor = ray.get_actor(f"SERVE_REPLICA::glm#{ray_app.DEPLOYMENT_NAME}#{victim}", namespace="serve")
    ray.kill(actor, no_restart=True)
    killed_at = time.monotonic()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(70)
    assert not any(t.is_alive() for t in threads), "a client is still waiting: a request hangs"
    print(f"\nray.kill under load: {dict(counts)}; errors: {errors[:3]}")
    assert counts["lost"] == 0
    assert counts["sent"] == counts["completed"] + counts["failed"]
    assert all("replica" in e and not e.startswith("unclear") for e in errors), errors  # ray_proxy.py's errors
    assert counts["completed"] > counts["failed"]  # the other replica kept serving

    # Serve replaces the killed replica: two replicas answer again, neither of them the victim
    seen: set[str] = set()
    while time.monotonic() - killed_at < 120 and len(seen) < 2:
        r = httpx.post(ray_base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        if r.status_code == 200:
            seen.add(r.headers["x-glm-replica"])
        else:
            time.sleep(0.5)
    assert len(seen) == 2 and victim not in seen
