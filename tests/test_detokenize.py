"""Streaming detokenization: never a broken character, and always the one-shot decode once finished."""

from __future__ import annotations

import random

import pytest

from glm_runtime.detokenize import StreamDecoder
from glm_runtime.tokenizer import GLMTokenizer
from tests import text_corpus
from tests.text_corpus import (
    EDGE_CASES,
    builtin_raw_dir,
    builtin_tokenizer_dir,
    converted_tokenizer_dir,
    tiktoken_reference,
)

STRINGS = (
    "你好，世界！今天天气很好。",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, 🇨🇳🇺🇸 flags, 1️⃣ keycap",
    "日本語のテキストと한국어 텍스트, русский текст, العربية, ภาษาไทย",
    "def f(x):\r\n\treturn x  # 注释\n\n\n",
    "<|user|> literal special text <|assistant|>",
    "mixed 中文 and English, 数字 12345 and emoji 🤖🧪",
)


def check_stream(decoder: StreamDecoder, ids: list[int], one_shot) -> None:
    """Feed ids one by one; after every step, emitted + held-back == the one-shot decode of that prefix."""
    emitted = ""
    for k, token_id in enumerate(ids, 1):
        piece = decoder.step(token_id)
        emitted += piece
        expected = one_shot(ids[:k])
        assert emitted + decoder.pending_bytes.decode("utf-8", "replace") == expected, (k, ids[:k])
        if "\ufffd" not in expected:
            assert "\ufffd" not in piece  # an unfinished character is held back, never emitted broken
    assert emitted + decoder.finish() == one_shot(ids)


def test_byte_table_without_any_tokenizer() -> None:
    """One id per byte: the hardest case (every multi-byte character arrives in pieces)."""
    table = [bytes([b]) for b in range(256)] + [b"<|user|>"]
    for text in (*STRINGS, "a\u00e9\u4e2d\U0001f600z"):
        ids = list(text.encode("utf-8"))
        for skip in (True, False):
            check_stream(StreamDecoder(table, {256}, skip), ids, lambda p: bytes(p).decode("utf-8", "replace"))
    # invalid bytes come out as U+FFFD exactly where a one-shot decode puts them
    invalid = [0xE4, 0xBD, 0x41, 0xFF, 0xF0, 0x9F, 0x98, 256, 0x80, 0xE4]
    one_shot = lambda p: b"".join(table[i] for i in p).decode("utf-8", "replace")  # noqa: E731
    check_stream(StreamDecoder(table, {256}, skip_special_tokens=False), invalid, one_shot)
    with pytest.raises(TypeError):
        StreamDecoder(table).step(-1)


@pytest.fixture(scope="module", params=["glm-4-9b-chat", "builtin"])
def glm_and_ref(request: pytest.FixtureRequest):
    """The real tokenizer (skipped without ../shared) and the built-in one, each with its tiktoken oracle."""
    if request.param == "builtin":
        return GLMTokenizer.from_dir(builtin_tokenizer_dir()), tiktoken_reference(builtin_raw_dir() / "tokenizer.model")
    chat_reference = request.getfixturevalue("chat_reference")
    return (
        GLMTokenizer.from_dir(converted_tokenizer_dir(chat_reference)),
        tiktoken_reference(chat_reference / "tokenizer.model"),
    )


@pytest.fixture(scope="module")
def glm(glm_and_ref) -> GLMTokenizer:
    return glm_and_ref[0]


@pytest.mark.parametrize("skip", [True, False])
def test_every_prefix_of_test_strings(glm_and_ref, skip: bool) -> None:
    glm, ref = glm_and_ref
    texts = [*STRINGS, *EDGE_CASES]
    texts += [doc[:400] for doc in text_corpus.corpus_documents()[:40]]
    for text in texts:
        ids = glm.encode(text, allow_special=True)
        check_stream(glm.stream_decoder(skip_special_tokens=skip), ids, lambda p: glm.decode(p, skip))
        if not skip:
            assert glm.decode(ids) == ref.decode(ids)  # the one-shot decode itself is the oracle's


def test_stream_over_a_whole_document(glm: GLMTokenizer) -> None:
    doc = max(text_corpus.corpus_documents()[:50], key=len)
    ids = glm.encode(doc)
    decoder = glm.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "".join(pieces) + decoder.finish() == doc
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in doc


def test_random_ids_specials_and_unknown_ids(glm: GLMTokenizer) -> None:
    rng = random.Random(5)
    for _ in range(200):
        ids = [rng.randrange(151343) for _ in range(rng.randint(1, 12))]
        ids += rng.sample([151329, 151336, 151337, 151400, 151551], 2)  # 151400+: padded rows without a token
        rng.shuffle(ids)
        for skip in (True, False):
            decoder = glm.stream_decoder(skip_special_tokens=skip)
            assert decoder.extend(ids) + decoder.finish() == glm.decode(ids, skip_special_tokens=skip)
