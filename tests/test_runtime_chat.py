"""The chat layer on a scripted engine: what the model "says" is fixed, so the expected text, tool calls and
finish reasons are known by construction (a random model never calls a tool)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glm_runtime import LLM
from glm_runtime.engine import Engine
from glm_runtime.manifest import model_config, read_manifest
from glm_runtime.tokenizer import GLMTokenizer

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object",
                                                             "properties": {"city": {"type": "string"}}}}}]


class ScriptedCache:
    def __init__(self, batch: int, cache_len: int) -> None:
        self.batch, self.cache_len = batch, cache_len

    @property
    def nbytes(self) -> int:
        return 0

    def addresses(self) -> list[int]:
        return []


class ScriptedEngine:
    """Answers every prompt with ``script``: the logits after position ``p`` favour ``script[p + 1 - start]``,
    where ``start`` is the position of the first generated token (the prompt length)."""

    cache_dtype = "float32"

    def __init__(self, config, script: list[int]) -> None:
        self.config, self.script = config, script
        self.prompt_len = 0
        self.logits = np.zeros((1, config.vocab_size), np.float32)

    @property
    def run_seconds(self) -> float:
        return 0.0

    def describe(self) -> str:
        return "scripted"

    def allocate(self, batch: int, cache_len: int) -> ScriptedCache:
        return ScriptedCache(batch, cache_len)

    def resize(self, cache: ScriptedCache, cache_len: int, keep: int) -> None:
        cache.cache_len = cache_len

    def step(self, cache, input_ids, position_ids, logits_index) -> np.ndarray:
        last = int(position_ids[0, int(logits_index[0, 0])])
        if input_ids.shape[1] > 1 or last < self.prompt_len:  # a prefill: the prompt ends at `last`
            self.prompt_len = last + 1
        self.logits[:] = 0
        self.logits[0, self.script[min(last + 1 - self.prompt_len, len(self.script) - 1)]] = 10
        return self.logits


@pytest.fixture(scope="module")
def tokenizer(tiny_artifact: Path) -> GLMTokenizer:
    return GLMTokenizer.from_dir(tiny_artifact)


def scripted(tiny_artifact: Path, tokenizer: GLMTokenizer, answer: str, end: str) -> LLM:
    manifest = read_manifest(tiny_artifact, verify="none")
    script = [*tokenizer.encode(answer), tokenizer.special_ids[end]]
    engine = ScriptedEngine(model_config(manifest), script)
    assert isinstance(engine, Engine)
    return LLM(tiny_artifact, manifest, engine, tokenizer, {"eos_token_id": [151329, 151336, 151338]})


def test_text_answer_drops_the_empty_metadata_line(tiny_artifact: Path, tokenizer: GLMTokenizer) -> None:
    llm = scripted(tiny_artifact, tokenizer, "\nHello, how can I help?", "<|user|>")
    chunks = list(llm.chat([{"role": "user", "content": "hi"}], tools=WEATHER, stream=True, temperature=0))
    done = chunks[-1].completion
    assert done.text == "Hello, how can I help?" == "".join(c.text for c in chunks)
    assert done.finish_reason == "stop" and done.output_ids[-1] == tokenizer.special_ids["<|user|>"]
    assert done.message == {"role": "assistant", "content": "Hello, how can I help?"}


def test_tool_call_is_parsed_not_streamed(tiny_artifact: Path, tokenizer: GLMTokenizer) -> None:
    llm = scripted(tiny_artifact, tokenizer, 'get_weather\n{"city": "Paris"}', "<|observation|>")
    chunks = list(llm.chat([{"role": "user", "content": "weather in Paris?"}], tools=WEATHER, stream=True,
                           temperature=0))
    assert all(c.text == "" for c in chunks)
    done = chunks[-1].completion
    assert done.finish_reason == "tool_calls" and done.text is None
    (call,) = done.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # The call goes back into the history and the next turn renders it as GLM-4 expects.
    history = [{"role": "user", "content": "weather in Paris?"}, done.message,
               {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
    rendered = tokenizer.apply_chat_template(llm_messages(history), tokenize=False)
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>' in rendered


def llm_messages(history: list[dict]) -> list[dict]:
    from glm_runtime.tool_calls import openai_to_glm_messages

    return openai_to_glm_messages(history, WEATHER)


def test_stop_string_in_chat(tiny_artifact: Path, tokenizer: GLMTokenizer) -> None:
    llm = scripted(tiny_artifact, tokenizer, "\none two three four five", "<|user|>")
    done = llm.chat([{"role": "user", "content": "count"}], stop=" three", temperature=0)
    assert done.text == "one two" and done.finish_reason == "stop"
    assert done.output_ids[-1] != tokenizer.special_ids["<|user|>"]  # ended by the string, not the stop id
