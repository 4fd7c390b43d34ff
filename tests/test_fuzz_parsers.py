"""Property-based fuzzing (hypothesis) of every reader of untrusted bytes (issue 19, item 4): safetensors headers
and index files, manifest.json, tokenizer.json and tokenizer_config.json, the chat template, generation_config.json,
and the tool-call parser on model output. The property: each either succeeds or raises the project's one-line
error type for that input (all ``ValueError`` subclasses with a message), never any other exception.

Inputs are built two ways: raw bytes, and structured near-misses (valid documents with fields dropped, retyped or
given extreme values), which reach far deeper into each parser than random bytes do.

Bounded for CI: ``GLM_FUZZ_EXAMPLES`` examples per target (default 150: about 10 s of fuzzing on 2 cores, plus the
shared tiny-artifact fixture).
A longer run: ``GLM_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz_parsers.py`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm_export.checkpoint import Checkpoint, CheckpointError, read_safetensors_header
from glm_runtime.api import LLM, read_generation_config
from glm_runtime.chat_template import ChatTemplateError, render_chat_template
from glm_runtime.config import ConfigError
from glm_runtime.manifest import ArtifactError, model_config, read_manifest
from glm_runtime.tokenizer import GLMTokenizer, TokenizerFileError
from glm_runtime.tool_calls import parse_assistant_output

EXAMPLES = int(os.environ.get("GLM_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

# JSON values, including the awkward ones: huge and negative integers, floats, deep nesting, odd strings.
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def mutate(doc: Any, data: st.DataObject, depth: int = 0) -> Any:
    """``doc`` with one value somewhere replaced, a key dropped, or nothing changed (hypothesis chooses)."""
    if isinstance(doc, dict) and doc and depth < 4:
        key = data.draw(st.sampled_from(sorted(doc, key=str)))
        action = data.draw(st.sampled_from(["descend", "drop", "replace"]))
        out = dict(doc)
        if action == "drop":
            del out[key]
        elif action == "replace":
            out[key] = data.draw(json_values)
        else:
            out[key] = mutate(doc[key], data, depth + 1)
        return out
    if isinstance(doc, list) and doc and depth < 4:
        i = data.draw(st.integers(0, len(doc) - 1))
        out = list(doc)
        out[i] = mutate(doc[i], data, depth + 1) if data.draw(st.booleans()) else data.draw(json_values)
        return out
    return data.draw(json_values) if data.draw(st.booleans()) else doc


@pytest.fixture(scope="module")
def workdir() -> Any:
    d = Path(tempfile.mkdtemp(prefix="glm-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---- safetensors headers ---------------------------------------------------------------------------------------
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "X"]) | scalars,
    "shape": st.lists(st.integers(-3, 2**40), max_size=3) | scalars,
    "data_offsets": st.lists(st.integers(-5, 2**40), max_size=3) | scalars,
})
headers = st.dictionaries(st.text(max_size=10), entry | json_values, max_size=4)


@fuzz
@given(raw=st.binary(max_size=200))
def test_safetensors_raw_bytes(workdir: Path, raw: bytes) -> None:
    path = workdir / "raw.safetensors"
    path.write_bytes(raw)
    try:
        read_safetensors_header(path)
    except CheckpointError:
        pass


@fuzz
@given(header=headers, data=st.integers(0, 64), length_delta=st.integers(-4, 4))
def test_safetensors_structured(workdir: Path, header: dict[str, Any], data: int, length_delta: int) -> None:
    blob = json.dumps(header).encode()
    path = workdir / "s.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + b"\0" * data)
    try:
        infos = read_safetensors_header(path)
    except CheckpointError:
        return
    assert all(isinstance(i.shape, tuple) for i in infos.values())


# ---- the checkpoint index ---------------------------------------------------------------------------------------
@fuzz
@given(data=st.data())
def test_checkpoint_index(tiny_checkpoint: Path, workdir: Path, data: st.DataObject) -> None:
    ckpt = workdir / "ckpt"
    if not ckpt.exists():
        shutil.copytree(tiny_checkpoint, ckpt)
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(mutate(index, data)))
    try:
        Checkpoint(ckpt).validate()
    except (CheckpointError, ConfigError):
        pass


# ---- manifest.json ----------------------------------------------------------------------------------------------
@fuzz
@given(data=st.data())
def test_manifest(tiny_artifact: Path, workdir: Path, data: st.DataObject) -> None:
    art = workdir / "art"
    if not art.exists():
        art.mkdir()
        for f in tiny_artifact.iterdir():
            if f.name != "manifest.json":
                (art / f.name).symlink_to(f)
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    text = json.dumps(mutate(manifest, data)) if data.draw(st.booleans()) else data.draw(st.text(max_size=50))
    (art / "manifest.json").write_text(text)
    try:
        model_config(read_manifest(art, verify="size"))
    except (ArtifactError, ConfigError):
        pass


# ---- tokenizer.json and tokenizer_config.json -------------------------------------------------------------------
@fuzz
@given(doc=json_values | st.fixed_dictionaries({"model": json_values, "added_tokens": json_values}),
       config=st.none() | json_values)
def test_tokenizer_files(workdir: Path, doc: Any, config: Any) -> None:
    d = workdir / "tok"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(doc))
    (d / "tokenizer_config.json").unlink(missing_ok=True)
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        GLMTokenizer.from_dir(d)
    except TokenizerFileError:
        pass


@fuzz
@given(data=st.data())
def test_real_tokenizer_config_mutated(tiny_artifact: Path, workdir: Path, data: st.DataObject) -> None:
    d = workdir / "tok2"
    if not d.exists():  # a small vocabulary: loading GLM-4's 151k-token file per example would take minutes
        from tokenizers import Tokenizer, models

        d.mkdir()
        Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(d / "tokenizer.json"))
    config = json.loads((tiny_artifact / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(mutate(config, data)))
    try:
        tok = GLMTokenizer.from_dir(d)
    except TokenizerFileError:
        return
    if tok.chat_template:
        try:
            render_chat_template(tok.chat_template, [{"role": "user", "content": "hi"}], deadline_s=0.5)
        except ChatTemplateError:
            pass


# ---- the chat template ------------------------------------------------------------------------------------------
fragments = st.sampled_from([
    "{{ messages }}", "{% for m in messages %}", "{% endfor %}", "{% if x %}", "{% endif %}", "{{ m.content }}",
    "{{ 1/0 }}", "{{ x.__class__ }}", "{{ ''.__class__.__mro__ }}", "{{ range(10)|join }}", "{{ 'a' * 99 }}",
    "{{ 2 ** 99 }}", "{% set n = namespace(a=1) %}", "{{ n._x }}", "{{ raise_exception('no') }}", "{{ tools }}",
    "{{ messages[0]['role'] }}", "{{ lipsum() }}", "{{ cycler }}", "{{ m|tojson }}", "{% macro f() %}",
    "{% endmacro %}", "{{ f() }}", "{%", "}}", "{#", "{{ x|default(y) }}", "{{ strftime_now('%Y') }}",
    "{{ 'x'.format(1) }}", "text",
])


@fuzz
@given(parts=st.lists(fragments, max_size=8), content=st.text(max_size=30),
       role=st.sampled_from(["user", "system", "assistant", "observation", "tool", ""]) | st.text(max_size=5))
def test_chat_template(parts: list[str], content: str, role: str) -> None:
    try:
        out = render_chat_template("".join(parts) or "x", [{"role": role, "content": content}], deadline_s=0.5)
    except ChatTemplateError:
        return
    assert isinstance(out, str)


# ---- generation_config.json -------------------------------------------------------------------------------------
gen_configs = st.fixed_dictionaries({}, optional={k: json_values | st.floats() for k in (
    "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "do_sample", "eos_token_id")})


@fuzz
@given(doc=gen_configs | json_values, raw=st.none() | st.binary(max_size=40))
def test_generation_config(workdir: Path, doc: Any, raw: bytes | None) -> None:
    path = workdir / "generation_config.json"
    path.write_bytes(raw if raw is not None else json.dumps(doc).encode())
    try:
        config = read_generation_config(path)
    except ArtifactError:
        return
    # What the runtime then does with it must not fail in another way either.
    fake = SimpleNamespace(generation_config=config, config=SimpleNamespace(eos_token_ids=(1, 2)))
    try:
        LLM._sampling(fake, None, None, None, None, None)  # type: ignore[arg-type]
    except ValueError:  # SamplingParams' own one-line refusal (e.g. temperature < 0)
        pass
    assert LLM.default_max_new_tokens(fake) >= 0  # type: ignore[arg-type]
    assert all(isinstance(i, int) for i in LLM.default_stop_ids(fake))  # type: ignore[arg-type]


# ---- the tool-call parser on model output -----------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "python"}]
outputs = st.one_of(
    st.text(max_size=80),
    st.builds(lambda name, args, tail: f"{name}\n{args}{tail}",
              st.sampled_from(["get_weather", "python", "unknown", "", "get_weather\n"]),
              st.one_of(st.text(max_size=30), json_values.map(json.dumps)), st.text(max_size=10)),
)


@fuzz
@given(text=outputs, tools=st.sampled_from([None, [], TOOLS]))
def test_tool_call_parser(text: str, tools: Any) -> None:
    parsed = parse_assistant_output(text, tools)
    assert parsed is not None
