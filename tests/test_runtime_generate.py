"""The runtime end to end on the tiny artifact: against the PyTorch model, batched vs alone, chunked vs whole,
reused conversation cache vs fresh, and every way a request can be refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from glm_export.checkpoint import load_model
from glm_runtime import LLM, load
from glm_runtime.api import TokenizerMissingError
from glm_runtime.engine import MemoryBudgetError
from glm_runtime.generator import ContextLengthError, Session, fit_context
from glm_runtime.manifest import ArtifactError
from glm_runtime.sampling import SamplingParams
from tests.conftest import copy_without_tokenizer

REPO = Path(__file__).resolve().parents[1]
GREEDY = {"temperature": 0, "stop_token_ids": ()}


@pytest.fixture(scope="module")
def llm(tiny_artifact: Path) -> LLM:
    return load(tiny_artifact, threads=2)


def with_chunk(llm: LLM, chunk: int) -> LLM:
    """The same engine and tokenizer with another prefill chunk (no reload)."""
    return LLM(llm.artifact, llm.manifest, llm.engine, llm.tokenizer, llm.generation_config, prefill_chunk=chunk)


def random_prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 151000, n).tolist()


def torch_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the PyTorch GLM-4 (glm_export.model), its own cache, one token at a time."""
    cache = model.new_cache(1, len(prompt) + n)
    ids = torch.tensor([prompt])
    pos = torch.arange(len(prompt))[None]
    index = torch.tensor([[len(prompt) - 1]])
    out: list[int] = []
    with torch.no_grad():
        for step in range(n):
            logits = model(ids, pos, index, *cache)[0]
            out.append(int(logits[0, -1].argmax()))
            ids, pos = torch.tensor([[out[-1]]]), torch.tensor([[len(prompt) + step]])
            index = torch.zeros(1, 1, dtype=torch.long)
    return out


# ---- correctness ----------------------------------------------------------------------------------------
def test_greedy_64_tokens_equal_pytorch(llm: LLM, tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    prompt = random_prompt(21, 0)
    expected = torch_greedy(model, prompt, 64)
    assert len(set(expected)) > 16, "a degenerate reference would make this test weak"
    got = llm.generate(prompt_ids=prompt, max_new_tokens=64, **GREEDY)
    assert got.output_ids == expected
    assert got.finish_reason == "length" and got.prompt_ids == prompt
    # Chunked prefill (chunks of 5: the last prompt token sits in a partial chunk) gives the same tokens.
    assert with_chunk(llm, 5).generate(prompt_ids=prompt, max_new_tokens=64, **GREEDY).output_ids == expected


def test_batch_equals_each_prompt_alone_even_when_one_finishes_early(llm: LLM) -> None:
    prompts = [random_prompt(n, 10 + n) for n in (5, 23, 11)]
    alone = [llm.generate(prompt_ids=p, max_new_tokens=24, **GREEDY).output_ids for p in prompts]
    # Make row 1 stop early: its 6th token becomes a stop id (rows that meet it earlier stop too, alone as well).
    stop = [alone[1][5]]
    alone = [llm.generate(prompt_ids=p, max_new_tokens=24, temperature=0, stop_token_ids=stop) for p in prompts]
    assert alone[1].finish_reason == "stop" and len(alone[1].output_ids) <= 6
    assert any(c.finish_reason == "length" for c in alone)
    # Batched, and chunked so that the short prompts' last tokens fall in earlier chunks than the long one's.
    batched = with_chunk(llm, 8).generate(prompt_ids=prompts, max_new_tokens=24, temperature=0,
                                          stop_token_ids=stop)
    assert [b.output_ids for b in batched] == [a.output_ids for a in alone]
    assert [b.finish_reason for b in batched] == [a.finish_reason for a in alone]


def test_text_batch_and_streaming_agree(llm: LLM) -> None:
    prompts = ["hello world", "a much longer prompt, with more words in it than the first one"]
    done = llm.generate(prompts, max_new_tokens=12, temperature=0)
    assert [d.prompt_ids[:2] for d in done] == [[151331, 151333]] * 2  # [gMASK]<sop> as GLM-4 encodes text
    streamed: dict[int, list] = {0: [], 1: []}
    last = {}
    for chunk in llm.generate(prompts, max_new_tokens=12, temperature=0, stream=True):
        streamed[chunk.index].append(chunk)
        if chunk.completion:
            last[chunk.index] = chunk.completion
    for i, d in enumerate(done):
        assert [t for c in streamed[i] for t in c.token_ids] == d.output_ids == last[i].output_ids
        assert "".join(c.text for c in streamed[i]) == d.text
        ids = d.output_ids[:-1] if d.finish_reason == "stop" else d.output_ids
        assert d.text == llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    full = llm.generate("tell me a story", max_new_tokens=24, temperature=0, stop_token_ids=())
    words = full.text.split(" ")
    stop = " " + words[len(words) // 2]
    cut = full.text[:full.text.index(stop)]
    got = llm.generate("tell me a story", max_new_tokens=24, temperature=0, stop_token_ids=(), stop=[stop, "§§"])
    assert got.finish_reason == "stop" and got.text == cut
    assert got.output_ids == full.output_ids[:len(got.output_ids)] and len(got.output_ids) < 24


def test_seeded_sampling_reproduces(llm: LLM) -> None:
    kw = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.9, "stop_token_ids": ()}
    a = llm.generate(prompt_ids=[5, 17, 300], seed=3, **kw)
    assert llm.generate(prompt_ids=[5, 17, 300], seed=3, **kw).output_ids == a.output_ids
    assert llm.generate(prompt_ids=[5, 17, 300], seed=4, **kw).output_ids != a.output_ids


def test_generation_config_defaults_apply(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    assert llm.generation_config["do_sample"] and llm.generation_config["temperature"] == 0.8
    params = llm._sampling(None, None, None, None, None)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.8, 0.8, 1.0)
    assert llm.default_stop_ids() == [151329, 151336, 151338]
    monkeypatch.setitem(llm.generation_config, "do_sample", False)
    assert llm._sampling(None, None, None, None, None).greedy
    monkeypatch.setitem(llm.generation_config, "max_new_tokens", 3)
    assert len(llm.generate(prompt_ids=[1, 2], stop_token_ids=()).output_ids) == 3


# ---- multi-turn -----------------------------------------------------------------------------------------
def test_session_reuses_prompt_and_generated_tokens(llm: LLM) -> None:
    gen, greedy = llm.generator, SamplingParams(temperature=0)
    session = Session()
    first_prompt = random_prompt(10, 1)
    first = gen.start([first_prompt], 20, greedy, session=session)
    while not first.done:
        first.step()
    out = first.rows[0].output
    assert session.tokens == first_prompt + out[:-1] and session.cache.cache_len == 64
    # The next prompt extends everything the cache holds (generated tokens included) and outgrows the buffer.
    second_prompt = first_prompt + out + random_prompt(15, 2)
    reused = gen.start([second_prompt], 60, greedy, session=session)
    assert reused.rows[0].start == len(first_prompt) + len(out) - 1
    assert reused.timings.prefilled_tokens == len(second_prompt) - reused.rows[0].start
    while not reused.done:
        reused.step()
    assert session.cache.cache_len == 128  # grown, old slots kept
    fresh = gen.start([second_prompt], 60, greedy)
    while not fresh.done:
        fresh.step()
    assert reused.rows[0].output == fresh.rows[0].output
    # A prompt that diverges early reuses only the common prefix, and still matches a fresh run.
    third = first_prompt[:4] + random_prompt(8, 3)
    diverged = gen.start([third], 10, greedy, session=session)
    assert diverged.rows[0].start == 4
    while not diverged.done:
        diverged.step()
    alone = gen.start([third], 10, greedy)
    while not alone.done:
        alone.step()
    assert diverged.rows[0].output == alone.rows[0].output


def test_chat_follow_up_prefills_only_the_new_turn(llm: LLM) -> None:
    llm.reset()
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    a1 = llm.chat(history, max_new_tokens=10, temperature=0)
    history += [a1.message, {"role": "user", "content": "and then?"}]
    a2 = llm.chat(history, max_new_tokens=10, temperature=0)
    assert a2.timings["reused_tokens"] >= len(a1.prompt_ids)
    assert a2.timings["prefilled_tokens"] == len(a2.prompt_ids) - a2.timings["reused_tokens"]
    fresh = llm.chat(history, max_new_tokens=10, temperature=0, reuse_cache=False)
    assert fresh.timings["reused_tokens"] == 0
    assert a2.output_ids == fresh.output_ids and a2.text == fresh.text
    # the full prompt is the chat template's rendering of the whole history
    assert a2.prompt_ids == llm.tokenizer.apply_chat_template(history)


# ---- limits and bad input -------------------------------------------------------------------------------
def test_context_limit_is_checked_before_any_compute(llm: LLM) -> None:
    before = llm.engine.run_seconds
    too_long = random_prompt(8000, 4)
    with pytest.raises(ContextLengthError, match=r"8000 tokens\) \+ max_new_tokens \(500\) = 8500 exceeds.*8192"):
        llm.generate(prompt_ids=too_long, max_new_tokens=500)
    with pytest.raises(ContextLengthError, match="truncate"):
        llm.chat([{"role": "user", "content": "word " * 9000}], max_new_tokens=10)
    assert llm.engine.run_seconds == before
    kept = fit_context([151331, 151333, *range(100)], 20, 64, truncate=True, keep_prefix=2)
    assert kept == [151331, 151333, *range(58, 100)] and len(kept) + 20 == 64
    with pytest.raises(ContextLengthError):
        fit_context([1, 2, 3], 64, 64, truncate=True)


def test_kv_budget_refuses_with_the_arithmetic(llm: LLM) -> None:
    small = LLM(llm.artifact, llm.manifest, llm.engine, llm.tokenizer, llm.generation_config, kv_budget_bytes=40_000)
    with pytest.raises(MemoryBudgetError, match=r"KV cache 3 x 64 tokens x 512 B/token .* = 96\.0 KiB.*budget"):
        small.generate(prompt_ids=[[1, 2], [3], [4]], max_new_tokens=8)
    assert small.generate(prompt_ids=[1, 2], max_new_tokens=8, stop_token_ids=()).finish_reason == "length"


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m.generate(""), "empty"),
    (lambda m: m.generate(prompt_ids=[]), "non-empty"),
    (lambda m: m.generate(prompt_ids=[1, 10**7]), "outside the vocabulary"),
    (lambda m: m.generate("hi", prompt_ids=[1]), "not both"),
    (lambda m: m.generate("hi", max_new_tokens=0), "positive"),
    (lambda m: m.generate("hi", stop=[""]), "stop"),
    (lambda m: m.chat([]), "non-empty"),
    (lambda m: m.chat([{"role": "wizard", "content": "hi"}]), "unknown role"),
    (lambda m: m.chat([{"role": "user", "content": 42}]), "content"),
    (lambda m: m.chat([{"role": "user", "content": "hi"}], temperature=-1), "temperature"),
])
def test_bad_requests_are_refused_clearly(llm: LLM, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(llm)


def test_corrupted_or_mismatched_artifact_is_refused(tmp_path: Path, tiny_artifact: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    data = bytearray((broken / "tokenizer.json").read_bytes())
    data[100] ^= 1
    (broken / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tokenizer\.json: sha256 differs"):
        load(broken)
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema version 99"):
        load(broken, verify="none")
    manifest["schema_version"] = 1
    manifest["model"]["head_dim"] = 32  # a manifest that doesn't describe its graph
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        load(broken, verify="none")


def test_artifact_without_tokenizer_generates_from_ids(tmp_path: Path, tiny_artifact: Path, llm: LLM) -> None:
    bare = copy_without_tokenizer(tiny_artifact, tmp_path / "bare")
    ids_only = load(bare, verify="size")
    got = ids_only.generate(prompt_ids=[5, 17, 300], max_new_tokens=6, **GREEDY)
    assert got.text is None
    assert got.output_ids == llm.generate(prompt_ids=[5, 17, 300], max_new_tokens=6, **GREEDY).output_ids
    for call in (lambda: ids_only.generate("hi"), lambda: ids_only.chat([{"role": "user", "content": "hi"}]),
                 lambda: ids_only.generate(prompt_ids=[1], stop="x")):
        with pytest.raises(TokenizerMissingError, match=r"needs a tokenizer.*--prompt-ids"):
            call()


def test_runtime_imports_no_torch_transformers_or_onnx(tiny_artifact: Path) -> None:
    code = f"""
import sys, importlib
import glm_runtime
for m in ("api", "cli", "config", "manifest", "engine", "engine_ort", "generator", "sampling", "tokenizer",
          "chat_template", "tool_calls", "detokenize"):
    importlib.import_module("glm_runtime." + m)
llm = glm_runtime.load({str(tiny_artifact)!r})
llm.generate(prompt_ids=[5, 17, 300], max_new_tokens=3)
llm.chat([{{"role": "user", "content": "hi"}}], max_new_tokens=3)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "glm_export"))
print("BAD", bad)
"""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'runtime'}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout, out.stdout
