"""Built-in tiny tokenizer: a valid GLM-4-shaped ranks file, exact against tiktoken, GLM-4's chat format."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from pathlib import Path

import pytest

from glm_export.builtin_tokenizer import write_builtin_tokenizer
from glm_runtime.tokenizer import GLMTokenizer
from tests import text_corpus
from tests.text_corpus import GLM4_SPECIALS, builtin_raw_dir, builtin_tokenizer_dir, tiktoken_reference

# docs/glm4-model.md's special-token table (an independent statement of the ids)
DOC_SPECIAL_IDS = {
    "<|endoftext|>": 151329,
    "[MASK]": 151330,
    "[gMASK]": 151331,
    "[sMASK]": 151332,
    "<sop>": 151333,
    "<eop>": 151334,
    "<|system|>": 151335,
    "<|user|>": 151336,
    "<|assistant|>": 151337,
    "<|observation|>": 151338,
    "<|begin_of_image|>": 151339,
    "<|end_of_image|>": 151340,
    "<|begin_of_video|>": 151341,
    "<|end_of_video|>": 151342,
}


@pytest.fixture(scope="module")
def built() -> Path:
    return builtin_tokenizer_dir()


@pytest.fixture(scope="module")
def glm(built: Path) -> GLMTokenizer:
    return GLMTokenizer.from_dir(built)


@pytest.fixture(scope="module")
def ranks() -> list[bytes]:
    lines = (builtin_raw_dir() / "tokenizer.model").read_text(encoding="ascii").splitlines()
    out = []
    for rank, line in enumerate(lines):
        token_b64, rank_text = line.split(" ")
        assert int(rank_text) == rank
        out.append(base64.b64decode(token_b64, validate=True))
    return out


def test_generation_is_deterministic_and_fast(tmp_path: Path) -> None:
    digests = []
    for run in range(2):
        start = time.perf_counter()
        write_builtin_tokenizer(tmp_path / str(run))
        assert time.perf_counter() - start < 10
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / str(run)).iterdir()})
    assert digests[0] == digests[1]
    assert set(digests[0]) == {"tokenizer.model", "tokenizer_config.json"}


def test_ranks_file_shape(ranks: list[bytes]) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

    assert len(ranks) == 151329
    assert len(set(ranks)) == len(ranks)
    assert ranks[:256] == [bytes([b]) for b in hf_bytes_to_unicode()]  # GPT-2 byte order, as GLM-4's file
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    for rank in range(256, len(ranks)):  # every token is a merge of two lower-ranked tokens
        token = ranks[rank]
        assert any(
            rank_of.get(token[:cut], rank) < rank and rank_of.get(token[cut:], rank) < rank
            for cut in range(1, len(token))
        ), (rank, token)


def test_first_256_match_glm4s_file(ranks: list[bytes], chat_reference: Path) -> None:
    real = (chat_reference / "tokenizer.model").read_text(encoding="ascii").splitlines()[:256]
    assert [base64.b64decode(line.split()[0]) for line in real] == ranks[:256]


def test_fillers_decode_to_readable_text(glm: GLMTokenizer) -> None:
    rng = random.Random(3)
    sample = [rng.randrange(10_000, 151329) for _ in range(2000)]
    text = glm.decode(sample)
    assert "\ufffd" not in text
    words = text.split()
    assert len(words) >= len(sample) and all(w.isalpha() for w in words)


def test_special_ids_are_glm4s(glm: GLMTokenizer, built: Path) -> None:
    assert glm.special_ids == DOC_SPECIAL_IDS
    config = json.loads((built / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()} == DOC_SPECIAL_IDS
    assert config["additional_special_tokens"] == list(GLM4_SPECIALS)
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>" and config["model_max_length"] > 0


def test_exact_against_tiktoken_on_the_corpus(glm: GLMTokenizer) -> None:
    ref = tiktoken_reference(builtin_raw_dir() / "tokenizer.model")
    docs = list(text_corpus.corpus_documents())
    assert glm.encode_batch(docs) == ref.encode_ordinary_batch(docs)
    text = text_corpus.corpus_text()
    ids = glm.encode(text)
    assert ids == ref.encode_ordinary(text)
    assert glm.decode(ids) == ref.decode(ids) == text
    special_text = "<|user|>x[gMASK]"
    assert glm.encode(special_text, allow_special=True) == ref.encode(special_text, allowed_special="all")
    assert glm.encode(special_text) == ref.encode_ordinary(special_text)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": ""},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
    {"role": "observation", "content": '{"temp_c": 3}'},
]


def test_chat_format_is_glm4s(glm: GLMTokenizer) -> None:
    # GLM-4's chat format as docs/glm4-model.md describes it, written out by hand
    expected = (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\n你好<|assistant|>\nHi!<|user|>\nWeather?"
        '<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n{"temp_c": 3}<|assistant|>'
    )
    assert glm.apply_chat_template(CHAT, tokenize=False) == expected
    assert glm.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False) == expected.removesuffix(
        "<|assistant|>"
    )
    ids = glm.apply_chat_template([{"role": "user", "content": "你好"}])
    assert ids[:4] == [151331, 151333, 151336, 198] and ids[-1] == 151337


def _special_structure(ids: list[int]) -> list[int]:
    return [i for i in ids if i >= 151329]


def test_same_structure_as_the_real_template(glm: GLMTokenizer, chat_reference: Path) -> None:
    real_config = json.loads((chat_reference / "tokenizer_config.json").read_text(encoding="utf-8"))
    real = GLMTokenizer(glm.backend, real_config)
    assert real.apply_chat_template(CHAT, tokenize=False) == glm.apply_chat_template(CHAT, tokenize=False)
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "python"},
        {"type": "cogview"},
    ]
    ours = glm.apply_chat_template(CHAT, tools=tools)
    theirs = real.apply_chat_template(CHAT, tools=tools)
    assert _special_structure(ours) == _special_structure(theirs)
    ours_text = glm.apply_chat_template(CHAT, tools=tools, tokenize=False)
    theirs_text = real.apply_chat_template(CHAT, tools=tools, tokenize=False)
    after_tools = "<|system|>\nBe brief."
    assert ours_text[ours_text.index(after_tools) :] == theirs_text[theirs_text.index(after_tools) :]
    assert "## get_weather" in ours_text and '"name": "get_weather"' in ours_text
    assert "ChatGLM" not in ours_text and "智谱" not in ours_text  # our own wording, not the publisher's
