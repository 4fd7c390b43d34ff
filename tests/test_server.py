"""The OpenAI-compatible server, through the real ``openai`` client (and raw httpx for what a client library hides),
against uvicorn servers started here on free loopback ports.

Expected answers come from the same requests run through the Python API (``LLM.chat`` / ``LLM.generate``:
the plain decode loop, one request alone), never from the server's own earlier output. Tool calls need a model
that calls tools, which random weights never do: those tests serve a scripted engine (what the "model" says is
fixed) through the same scheduler and HTTP code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from glm_runtime import LLM, load
from glm_runtime.manifest import model_config, read_manifest
from glm_runtime.scheduler import Scheduler
from glm_runtime.server import ServerSettings, create_app
from glm_runtime.tool_calls import openai_to_glm_messages
from tests.test_runtime_chat import ScriptedCache

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
MODEL = "tiny"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object",
                                                             "properties": {"city": {"type": "string"}}}}}]


@contextmanager
def running(llm: LLM, scheduler: Scheduler, **settings) -> Iterator[str]:
    """A uvicorn server in a thread on a free loopback port; yields its base URL."""
    app = create_app(llm, scheduler, ServerSettings(MODEL, **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.close()


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(tiny_artifact: Path) -> LLM:
    return load(tiny_artifact, threads=2, verify="none")


@pytest.fixture(scope="module")
def served(llm: LLM) -> Iterator[tuple[str, Scheduler]]:
    sched = Scheduler(llm.engine, max_concurrency=3, max_queue=2, kv_budget_bytes=1 << 30)
    with running(llm, sched, api_key=KEY, max_body_bytes=100_000, max_tokens_limit=256) as base:
        yield base, sched


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 151000, n).tolist()


# ---- the OpenAI surface -------------------------------------------------------------------------------------
def test_models_health_and_api_key(served: tuple[str, Scheduler]) -> None:
    base, _ = served
    assert [m.id for m in client(base).models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong-key-000000").models.list()
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(base + "/metrics").status_code == 401
    assert httpx.get(base + "/health").json()["status"] == "ok"  # liveness probes need no key


def test_chat_whole_and_streamed_equal_the_python_api(served: tuple[str, Scheduler], llm: LLM) -> None:
    base, _ = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the sea"}]
    ref = llm.chat(messages, max_new_tokens=20, temperature=0, reuse_cache=False)
    got = client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    choice = got.choices[0]
    assert choice.message.content == ref.text and choice.finish_reason == ref.finish_reason
    assert got.usage.prompt_tokens == len(llm.tokenizer.apply_chat_template(messages)) == len(ref.prompt_ids)
    assert got.usage.completion_tokens == len(ref.output_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    stream = client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.output_ids)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed


def test_completions_text_ids_stop_and_seed_equal_the_python_api(served: tuple[str, Scheduler], llm: LLM) -> None:
    c = client(base := served[0])
    full = llm.generate("tell me a story", max_new_tokens=24, temperature=0, stop_token_ids=())
    got = c.completions.create(model=MODEL, prompt="tell me a story", max_tokens=24, temperature=0,
                               extra_body={"ignore_eos": True})
    assert got.choices[0].text == full.text and got.usage.prompt_tokens == len(full.prompt_ids)
    words = full.text.split(" ")
    stop = " " + words[len(words) // 2]
    cut = llm.generate("tell me a story", max_new_tokens=24, temperature=0, stop_token_ids=(), stop=[stop])
    got = c.completions.create(model=MODEL, prompt="tell me a story", max_tokens=24, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert got.choices[0].text == cut.text and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(cut.output_ids) < 24
    prompt = ids(9, 1)
    sampled = llm.generate(prompt_ids=prompt, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=5,
                           stop_token_ids=())
    got = c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.9, seed=5,
                               extra_body={"ignore_eos": True})
    assert got.choices[0].text == sampled.text and got.usage.completion_tokens == 16
    # OpenAI's default max_tokens for completions is 16; several prompts give one choice each, in order.
    both = c.completions.create(model=MODEL, prompt=[prompt, ids(4, 2)], temperature=0,
                                extra_body={"ignore_eos": True})
    alone = [llm.generate(prompt_ids=p, max_new_tokens=16, temperature=0, stop_token_ids=()).text
             for p in (prompt, ids(4, 2))]
    assert [ch.text for ch in both.choices] == alone and both.usage.prompt_tokens == 13
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}) as h:
        lines = [ln for ln in h.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5,
                                                              "stream": True, "temperature": 0}).iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_concurrent_requests_are_batched_and_equal_each_alone(served: tuple[str, Scheduler], llm: LLM) -> None:
    base, sched = served
    specs = [(ids(5, 11), 40), (ids(30, 12), 12), (ids(2, 13), 33), (ids(17, 14), 25), (ids(60, 15), 8)]
    expected = [llm.generate(prompt_ids=p, max_new_tokens=n, temperature=0, stop_token_ids=()).text
                for p, n in specs]
    steps, rows = sched.stats.decode_steps, sched.stats.decode_rows

    def one(spec: tuple[list[int], int]) -> str:
        stream = client(base).completions.create(model=MODEL, prompt=spec[0], max_tokens=spec[1], temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join(ch.choices[0].text for ch in stream if ch.choices)

    with ThreadPoolExecutor(len(specs)) as pool:  # 5 at once: 3 rows + 2 queued
        got = list(pool.map(one, specs))
    assert got == expected
    assert sched.stats.decode_rows - rows > 1.5 * (sched.stats.decode_steps - steps)  # shared decode steps


def test_client_errors_are_openai_style_4xx(served: tuple[str, Scheduler]) -> None:
    base, _ = served
    c = client(base)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=MODEL, prompt=ids(8000, 3), max_tokens=200)
    with pytest.raises(openai.BadRequestError, match="limit of 256"):
        c.completions.create(model=MODEL, prompt="hi", max_tokens=1000)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat = "/v1/chat/completions"
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (chat, b"{not json", 400, "not valid JSON"),
        (chat, b"[1, 2]", 400, "JSON object"),
        (chat, json.dumps({**good, "max_tokens": "5"}).encode(), 400, "max_tokens"),
        (chat, json.dumps({**good, "temperature": -1}).encode(), 400, "temperature"),
        (chat, json.dumps({"model": MODEL}).encode(), 400, "messages"),
        (chat, json.dumps({**good, "messages": []}).encode(), 400, "messages"),
        (chat, json.dumps({**good, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "unknown role"),
        (chat, json.dumps({**good, "messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
        (chat, json.dumps({**good, "tools": [{"type": "nope"}]}).encode(), 400, "unknown type"),
        (chat, json.dumps({**good, "tool_choice": "required"}).encode(), 400, "tool_choice"),
        (chat, json.dumps({**good, "n": 9}).encode(), 400, "sequences"),
        (chat, json.dumps({**good, "n": 10**30}).encode(), 400, "sequences"),  # refused before building them
        (chat, b"[" * 50_000, 400, "JSON"),
        (chat, json.dumps({**good, "logprobs": True, "top_logprobs": 21}).encode(), 400, "top_logprobs"),
        (chat, json.dumps({**good, "frequency_penalty": 0.5}).encode(), 400, "repetition_penalty"),
        (chat, json.dumps({**good, "stop": [""]}).encode(), 400, "stop"),
        (chat, json.dumps({**good, "messages": [{"role": "user", "content": "x" * 120_000}]}).encode(), 413, "bytes"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 10**8]}).encode(), 400, "vocabulary"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": []}).encode(), 400, "empty"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": [True]}).encode(), 400, "prompt"),
        ("/v1/nothing", b"{}", 404, "/v1"),
    ]
    with httpx.Client(base_url=base, headers=auth) as h:
        for path, body, status, message in cases:
            r = h.post(path, content=body)
            assert r.status_code == status, (body[:80], r.text)
            err = r.json()["error"]
            assert message in err["message"] and err["type"], (body[:80], err)
        r = h.get(chat)
        assert r.status_code == 405 and "error" in r.json()
    text = httpx.get(base + "/metrics", headers=auth).text
    assert 'code="500"' not in text and 'glm_http_requests_total{path="/v1/chat/completions",code="400"}' in text


def test_full_server_429_and_disconnect_frees_the_row(served: tuple[str, Scheduler],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base, sched = served
    # Every row must still be generating when its client leaves, or it ends by length, not by the disconnect. A fast
    # CPU runs the tiny model's 256 tokens in ~0.1-0.3 s (CI saw 2 of 5 streams and the whole answer below finish
    # first), so each engine step is slowed to >= 10 ms: 256 tokens take >= 2.5 s, far more than this test's steps.
    step = sched.engine.step

    def slow_step(*args: object, **kwargs: object) -> object:
        time.sleep(0.01)
        return step(*args, **kwargs)

    monkeypatch.setattr(sched.engine, "step", slow_step)
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 256, "stream": True, "temperature": 0,
            "ignore_eos": True}
    auth = {"Authorization": f"Bearer {KEY}"}
    clients = [httpx.Client(base_url=base, headers=auth, timeout=60) for _ in range(5)]
    streams = []
    cancelled = sched.stats.finished.get("cancelled", 0)
    try:
        for h in clients:  # 3 rows + 2 queue places
            cm = h.stream("POST", "/v1/completions", json=body)
            assert cm.__enter__().status_code == 200
            streams.append(cm)
        with pytest.raises(openai.RateLimitError, match="retry later"):
            client(base).completions.create(model=MODEL, prompt=[1, 2], max_tokens=2)
    finally:
        for cm in streams:  # the clients go away mid-stream
            cm.__exit__(None, None, None)
        for h in clients:
            h.close()
    t0 = time.monotonic()
    while sched.snapshot()["running"] + sched.snapshot()["queued"] and time.monotonic() < t0 + 5:
        time.sleep(0.01)
    assert sched.snapshot()["running"] == sched.snapshot()["queued"] == 0, "disconnected streams kept their rows"
    assert time.monotonic() - t0 < 3.0  # typically < 0.1 s; loose for a loaded CI machine
    assert sched.stats.finished.get("cancelled", 0) - cancelled == 5  # ended by the disconnects, not by length
    got = client(base).completions.create(model=MODEL, prompt=[1, 2], max_tokens=2)
    assert got.usage.completion_tokens <= 2
    # A client waiting for a whole (not streamed) answer that gives up frees its row too (the server looks for gone
    # clients every DISCONNECT_POLL_S, 0.25 s).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json={**body, "stream": False}, headers=auth,
                   timeout=httpx.Timeout(10.0, read=0.1))
    t0 = time.monotonic()
    while sched.snapshot()["running"] and time.monotonic() < t0 + 5:
        time.sleep(0.01)
    assert sched.snapshot()["running"] == 0 and time.monotonic() - t0 < 3.0
    assert sched.stats.finished.get("cancelled", 0) - cancelled == 6


def test_artifact_without_tokenizer_serves_token_ids(tiny_artifact: Path, tmp_path: Path, llm: LLM) -> None:
    from tests.conftest import copy_without_tokenizer

    bare = load(copy_without_tokenizer(tiny_artifact, tmp_path / "bare"), threads=2, verify="none")
    prompt = ids(6, 7)
    expected = llm.generate(prompt_ids=prompt, max_new_tokens=10, temperature=0, stop_token_ids=()).output_ids
    with running(bare, Scheduler(bare.engine, max_concurrency=2, kv_budget_bytes=1 << 30)) as base:
        with httpx.Client(base_url=base) as h:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
            got = h.post("/v1/completions", json=body).json()
            assert got["choices"][0]["token_ids"] == expected and got["choices"][0]["text"] == ""
            lines = [json.loads(ln[6:]) for ln in h.post("/v1/completions", json={**body, "stream": True}).iter_lines()
                     if ln.startswith("data: {")]
            assert [t for ln in lines for t in ln["choices"][0].get("token_ids", [])] == expected
            r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
            r = h.post("/v1/completions", json={"model": MODEL, "prompt": "text"})
            assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


# ---- tool calls, on a scripted "model" ----------------------------------------------------------------------
class ScriptedRowEngine:
    """After position ``p`` every row "says" ``script[p + 1 - prompt_len]`` (then the script's last token)."""

    cache_dtype = "float32"

    def __init__(self, config) -> None:
        self.config, self.script, self.prompt_len = config, [0], 0

    @property
    def run_seconds(self) -> float:
        return 0.0

    def describe(self) -> str:
        return "scripted"

    def allocate(self, batch: int, cache_len: int) -> ScriptedCache:
        return ScriptedCache(batch, cache_len)

    def resize(self, cache: ScriptedCache, cache_len: int, keep: int) -> None:
        cache.cache_len = cache_len

    def rows(self, cache: ScriptedCache, start: int, stop: int) -> ScriptedCache:
        return ScriptedCache(stop - start, cache.cache_len)

    def copy_rows(self, cache: ScriptedCache, src: int, dst: int, length: int) -> None:
        pass

    def step(self, cache, input_ids, position_ids, logits_index) -> np.ndarray:
        logits = np.zeros((input_ids.shape[0], self.config.vocab_size), np.float32)
        for b in range(input_ids.shape[0]):
            i = int(position_ids[b, int(logits_index[b, 0])]) + 1 - self.prompt_len
            logits[b, self.script[min(max(i, 0), len(self.script) - 1)]] = 10
        return logits


def test_tool_calls_round_trip(tiny_artifact: Path, llm: LLM) -> None:
    manifest = read_manifest(tiny_artifact, verify="none")
    engine = ScriptedRowEngine(model_config(manifest))
    scripted = LLM(tiny_artifact, manifest, engine, llm.tokenizer, {"eos_token_id": [151329, 151336, 151338]})
    tok = llm.tokenizer
    observation, user = tok.special_ids["<|observation|>"], tok.special_ids["<|user|>"]

    def expect(messages: list, answer: str, end: int, prefix: str = "") -> int:
        prompt = tok.apply_chat_template(openai_to_glm_messages(messages, WEATHER)) + tok.encode(prefix)
        engine.prompt_len, engine.script = len(prompt), [*tok.encode(answer), end]
        return len(prompt)

    with running(scripted, Scheduler(engine, max_concurrency=2, kv_budget_bytes=1 << 30)) as base:
        c = client(base, "unused")
        messages = [{"role": "user", "content": "weather in Beijing?"}]
        n = expect(messages, 'get_weather\n{"city": "Beijing"}', observation)
        got = c.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER)
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls" and got.usage.prompt_tokens == n
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Beijing"}
        assert call.id.startswith("call_") and call.type == "function"
        # Streamed: no text leaks out of the call; the call arrives whole in one delta.
        chunks = list(c.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER, stream=True))
        assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
            (0, "get_weather", {"city": "Beijing"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # The result goes back as a tool message; the answer is text again.
        history = [*messages, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny"}'}]
        n = expect(history, "\nIt is sunny in Beijing.", user)
        got = c.chat.completions.create(model=MODEL, messages=history, tools=WEATHER)
        assert got.choices[0].message.content == "It is sunny in Beijing." and got.choices[0].finish_reason == "stop"
        assert got.usage.prompt_tokens == n and not got.choices[0].message.tool_calls
        # tool_choice naming a function forces the call: the name is put on the answer's metadata line.
        n = expect(messages, '{"city": "Paris"}', observation, prefix="get_weather\n")
        got = c.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert got.usage.prompt_tokens == n and got.choices[0].finish_reason == "tool_calls"
        assert json.loads(got.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


# ---- the command, and SIGTERM -------------------------------------------------------------------------------
def test_serve_command_stops_gracefully_on_sigterm(tiny_artifact: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'runtime'}{os.pathsep}{REPO}"}
    cmd = [sys.executable, "-c", "from glm_runtime.cli import app; app()", "serve", str(tiny_artifact),
           "--port", str(port), "--api-key-file", str(key_file), "--verify", "none", "--shutdown-timeout", "2",
           "--max-concurrency", "2", "--model-name", MODEL, "--threads", "2", "--max-tokens-limit", "8000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        results: dict[str, list[str]] = {}
        started = {"short": threading.Event(), "endless": threading.Event()}

        def stream(name: str, max_tokens: int) -> None:
            with httpx.stream("POST", base + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": max_tokens, "stream": True,
                                    "ignore_eos": True}) as r:
                lines = results.setdefault(name, [])
                for ln in r.iter_lines():
                    if ln:
                        lines.append(ln)
                        started[name].set()

        # SIGTERM once both requests are streaming (events, not a sleep: the decode speed of the host does not
        # matter). With 2 s of grace the 30-token request needs >= 15 tok/s to finish (the tiny model decodes
        # hundreds even on a loaded host); the 8000-token one would need 4000 tok/s (~4x a quiet 2-core host).
        threads = [threading.Thread(target=stream, args=("endless", 8000)),
                   threading.Thread(target=stream, args=("short", 30))]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started.values()), results
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(base + "/health", timeout=2)
        assert proc.wait(30) == 0, proc.stdout.read() if proc.stdout else ""
        for t in threads:
            t.join(10)
        finals = {k: json.loads(v[-2][6:])["choices"][0]["finish_reason"] for k, v in results.items()}
        assert finals == {"short": "length", "endless": "cancelled"}, results
        assert all(v[-1] == "data: [DONE]" for v in results.values())
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_without_the_server_extra_says_what_to_install(tiny_artifact: Path) -> None:
    code = "import sys; sys.modules['fastapi'] = None; from glm_runtime.cli import app; app()"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'runtime'}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-c", code, "serve", str(tiny_artifact)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 1 and "pip install 'glm-runtime[server]'" in out.stderr, out.stderr
    # ...while the runtime itself (generate) works without it.
    out = subprocess.run([sys.executable, "-c", code, "generate", str(tiny_artifact), "--prompt-ids", "5,6",
                          "--max-new-tokens", "2", "--json", "--verify", "none"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0 and len(json.loads(out.stdout)["output_ids"]) == 2, out.stderr


def test_malformed_bodies_never_give_a_500(llm: LLM) -> None:
    """Odd values in every field of a chat request (the types a JSON body can hold): always a 4xx with OpenAI's
    error body, or a normal answer; never a 500."""
    from fastapi.testclient import TestClient

    sched = Scheduler(llm.engine, max_concurrency=2, kv_budget_bytes=1 << 30)
    app = create_app(llm, sched, ServerSettings(MODEL, max_tokens_limit=64))
    odd = [None, 5, -1, 1.5, "x", "", [], {}, [1], ["a"], [{}], {"a": 1}, True, [[[]]], 10**30, [None]]
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    bodies = [{**base, f: v} for f in ("messages", "tools", "tool_choice", "temperature", "top_p", "top_k", "n",
                                       "stop", "seed", "stream_options", "response_format", "max_tokens") for v in odd]
    bodies += [{**base, "messages": [{"role": "assistant", "content": "x", f: v}, {"role": "user", "content": "y"}]}
               for f in ("role", "content", "tool_calls", "function_call", "name") for v in odd]
    bodies += [{**base, "tools": [{"type": "function", "function": v}]} for v in odd]
    bodies += [{**base, "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                                      "arguments": v}}]}]}
               for v in odd]
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            for body in bodies:
                r = c.post("/v1/chat/completions", content=json.dumps(body))
                assert r.status_code < 500, (body, r.text)
                if r.status_code >= 400:
                    assert r.json()["error"]["message"], body
    finally:
        sched.close()
