"""Server features beyond plain generation (issue 17): prefix caching seen from HTTP (usage and ``/metrics``),
logprobs and echo, structured output, ``/tokenize`` and ``/detokenize``. Expected values come from the Python API
or a direct ONNX Runtime run, never from the server's own earlier output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
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


# ---- logprobs ---------------------------------------------------------------------------------------------
def ort_log_softmax(llm: LLM, ids: list[int]) -> tuple[np.ndarray, float]:
    """The reference: one plain ONNX Runtime run of the artifact's graph over ``ids`` (empty cache, logits at
    every position), log-softmax in float64; and the bound two float32 runs' logprobs may differ by
    (numerics.py: each logit by the fp32 bound, the normalizer by at most as much)."""
    import onnxruntime as ort

    from glm_export import numerics
    from glm_runtime.engine_ort import numpy_dtype

    cfg, n = llm.config, len(ids)
    sess = ort.InferenceSession(str(llm.engine.model_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.asarray([ids], np.int64), "position_ids": np.arange(n, dtype=np.int64)[None],
             "logits_index": np.arange(n, dtype=np.int64)[None]}
    for i in range(cfg.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_{kv}_{i}"] = np.zeros((1, cfg.num_kv_heads, n, cfg.head_dim),
                                               numpy_dtype(llm.engine.cache_dtype))
    logits = sess.run(["logits"], feeds)[0][0].astype(np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    bound = 2 * numerics.fp32_logit_bound(cfg, n, float(np.abs(logits).max())) + 1e-6
    return logp, bound


def test_completion_echo_logprobs_equal_a_direct_onnx_runtime_run(served: tuple[str, Scheduler], llm: LLM) -> None:
    base, _ = served
    ids = np.random.default_rng(5).integers(0, 150000, 21).tolist()
    body = {"model": MODEL, "prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 5,
            "ignore_eos": True}
    r = httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    gen = alone_ids(llm, ids, 4)
    ref, bound = ort_log_softmax(llm, ids + gen[:-1])
    full = ids + gen
    assert len(lp["token_logprobs"]) == len(full) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [ref[t - 1, full[t]] for t in range(1, len(full))]
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, rtol=0, atol=bound)
    for t in range(1, len(full)):
        top = lp["top_logprobs"][t]
        assert 1 <= len(top) <= 5  # 5 candidates (fewer if two decode to the same string)
        assert max(top.values()) == pytest.approx(ref[t - 1].max(), abs=bound)
    for t in range(len(ids), len(full)):  # greedy: each generated token is the best one
        assert lp["token_logprobs"][t] == pytest.approx(max(lp["top_logprobs"][t].values()), abs=1e-6)
    # The same request streamed: the same tokens and values, split over chunks (the prompt's first).
    chunks = stream_json(base + "/v1/completions", {**body, "stream": True})
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c.get("choices") and c["choices"][0]["logprobs"]]
    assert [v for s in streamed for v in s["token_logprobs"]] == lp["token_logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == r.json()["choices"][0]["text"]


def test_chat_logprobs_equal_a_direct_onnx_runtime_run(served: tuple[str, Scheduler], llm: LLM) -> None:
    base, _ = served
    messages = [{"role": "user", "content": "Count to three."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "ignore_eos": True}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    prompt = llm.chat_prompt(messages)
    gen = alone_ids(llm, prompt, 6)
    ref, bound = ort_log_softmax(llm, prompt + gen[:-1])
    assert len(content) == 6
    np.testing.assert_allclose([e["logprob"] for e in content],
                               [ref[len(prompt) - 1 + i, g] for i, g in enumerate(gen)], rtol=0, atol=bound)
    assert all(len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][2]["logprob"]
               for e in content)
    assert [e["token"] for e in content] == [llm.tokenizer.decode([g]) for g in gen]
    chunks = stream_json(base + "/v1/chat/completions", {**body, "stream": True})
    streamed = [e for c in chunks if c.get("choices") and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in content]
    bad = httpx.post(base + "/v1/chat/completions", json={**body, "top_logprobs": 21}, headers=AUTH)
    assert bad.status_code == 400 and "top_logprobs" in bad.text


def alone_ids(llm: LLM, ids: list[int], n: int) -> list[int]:
    return llm.generate(prompt_ids=ids, max_new_tokens=n, temperature=0, stop_token_ids=()).output_ids


def stream_json(url: str, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


# ---- tokenizer endpoints ------------------------------------------------------------------------------------
def test_tokenize_detokenize_and_tokenizer_info(served: tuple[str, Scheduler], llm: LLM) -> None:
    base, _ = served
    r = httpx.post(base + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}, headers=AUTH)
    assert r.status_code == 200 and r.json()["tokens"] == llm.tokenizer.encode("Hello world")
    r = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}, headers=AUTH)
    assert r.json()["tokens"] == llm.text_prompt_ids("Hello world", None)[0]  # what /v1/completions prefills
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(base + "/tokenize", json={"messages": messages}, headers=AUTH)
    assert r.json()["tokens"] == llm.chat_prompt(messages) and r.json()["count"] == len(llm.chat_prompt(messages))
    r = httpx.post(base + "/detokenize", json={"tokens": llm.tokenizer.encode("Hello world")}, headers=AUTH)
    assert r.json() == {"prompt": "Hello world"}
    info = httpx.get(base + "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] and info["chat_template"] and info["model_max_length"] > 0
    assert httpx.post(base + "/detokenize", json={"tokens": [10**9]}, headers=AUTH).status_code == 400
    assert httpx.post(base + "/tokenize", json={"prompt": "x"}).status_code == 401


# ---- structured output (a scripted "model" that would break the format; the grammar must not let it) ------------
UNIT = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "ok": {"type": "boolean"}},
        "required": ["unit", "ok"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": UNIT}},
         {"type": "function", "function": {"name": "set_alarm", "parameters": {
             "type": "object", "properties": {"hour": {"enum": [6, 7, 8]}}, "required": ["hour"],
             "additionalProperties": False}}}]


def valid_unit(args: dict) -> bool:
    return set(args) == {"unit", "ok"} and args["unit"] in ("c", "f") and isinstance(args["ok"], bool)


@pytest.fixture(scope="module")
def scripted(tiny_artifact: Path, llm: LLM) -> Iterator[tuple[str, object]]:
    from glm_runtime.manifest import model_config, read_manifest
    from tests.test_server import ScriptedRowEngine

    manifest = read_manifest(tiny_artifact, verify="none")
    engine = ScriptedRowEngine(model_config(manifest))
    model = LLM(tiny_artifact, manifest, engine, llm.tokenizer, {"eos_token_id": [151329, 151336, 151338]})
    with running(model, Scheduler(engine, max_concurrency=2, kv_budget_bytes=1 << 30), api_key=KEY) as base:
        yield base, engine


def say(engine, llm: LLM, messages: list, answer: str, tools: list | None = None, prefix: str = "") -> None:
    from glm_runtime.tool_calls import openai_to_glm_messages

    tok = llm.tokenizer
    prompt = tok.apply_chat_template(openai_to_glm_messages(messages, tools)) + tok.encode(prefix)
    engine.prompt_len, engine.script = len(prompt), [*tok.encode(answer), tok.special_ids["<|user|>"]]


def test_response_format_json_schema_holds_a_model_that_breaks_it(scripted, llm: LLM) -> None:
    base, engine = scripted
    c = client(base)
    messages = [{"role": "user", "content": "unit?"}]
    say(engine, llm, messages, '\n{"unit":"x","ok":maybe}')  # what the "model" wants: two invalid values
    free = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=40)
    assert free.choices[0].message.content.strip() == '{"unit":"x","ok":maybe}'  # unconstrained: as scripted
    fmt = {"type": "json_schema", "json_schema": {"name": "unit", "schema": UNIT, "strict": True}}
    got = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, response_format=fmt)
    assert got.choices[0].finish_reason == "stop"
    assert valid_unit(json.loads(got.choices[0].message.content)), got.choices[0].message.content
    say(engine, llm, messages, '\n{"a":[1,2]} is the answer, and more prose.')
    got = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                    response_format={"type": "json_object"})
    assert got.choices[0].finish_reason == "stop"  # the object is complete: the answer ends there
    assert json.loads(got.choices[0].message.content) == {"a": [1, 2]}
    bad = httpx.post(base + "/v1/chat/completions", headers=AUTH, json={
        "model": MODEL, "messages": messages,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert bad.status_code == 400, bad.text


def test_tool_choice_required_and_named_give_calls_that_parse(scripted, llm: LLM) -> None:
    base, engine = scripted
    c = client(base)
    messages = [{"role": "user", "content": "weather?"}]
    say(engine, llm, messages, "\nI will not call anything.", TOOLS)
    got = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                    max_tokens=40)
    assert got.choices[0].finish_reason == "tool_calls"
    (call,) = got.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert (call.function.name, valid_unit(args) if call.function.name == "get_weather" else args["hour"] in (6, 7, 8)
            ) in {("get_weather", True), ("set_alarm", True)}
    say(engine, llm, messages, '{"city":"Paris"}', TOOLS, prefix="get_weather\n")
    got = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = got.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and valid_unit(json.loads(call.function.arguments))


def test_tool_choice_required_on_the_onnx_runtime_engine(served: tuple[str, Scheduler]) -> None:
    base, sched = served
    before = sched.stats.grammar_tokens
    got = client(base).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "alarm?"}],
                                               tools=TOOLS, tool_choice="required", max_tokens=40, temperature=0.8,
                                               seed=3)
    assert got.choices[0].finish_reason == "tool_calls"  # random weights, and still a call that parses
    (call,) = got.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert valid_unit(args) if call.function.name == "get_weather" else args["hour"] in (6, 7, 8)
    assert sched.stats.grammar_tokens - before == got.usage.completion_tokens
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f"glm_grammar_tokens_total {sched.stats.grammar_tokens}" in text and "glm_grammar_seconds_total" in text
