"""GLM-4 tokenizer on `tokenizers` vs. an independent oracle: tiktoken built from the same ranks file."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from glm_runtime.tokenizer import (
    GLMTokenizer,
    TokenizerFileError,
    convert_tiktoken_file,
    write_tokenizer_json,
)
from tests import text_corpus
from tests.text_corpus import EDGE_CASES, GLM4_SPECIALS, converted_tokenizer_dir, tiktoken_reference


@pytest.fixture(scope="module")
def glm(chat_reference: Path) -> GLMTokenizer:
    return GLMTokenizer.from_dir(converted_tokenizer_dir(chat_reference))


@pytest.fixture(scope="module")
def ref(chat_reference: Path):
    return tiktoken_reference(chat_reference / "tokenizer.model")


@pytest.fixture(scope="module")
def docs() -> tuple[str, ...]:
    return text_corpus.corpus_documents()


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    return f"first difference at {i}: reference {a[i - 2 : i + 4]} vs ours {b[i - 2 : i + 4]}"


def test_corpus_is_a_megabyte_of_mixed_text(docs: tuple[str, ...]) -> None:
    text = "".join(docs)
    assert len(text.encode("utf-8")) >= 1_000_000
    for sample in ("我们", "the", "def ", "\r\n", "\u200d", "\u3000", "<|user|>", "ก", "한", "я", "ع", "\t"):
        assert sample in text, sample
    assert text_corpus.corpus_documents() is docs  # cached, and the same on every call


def test_special_ids_match_the_checkpoint(glm: GLMTokenizer, chat_reference: Path) -> None:
    config = json.loads((chat_reference / "tokenizer_config.json").read_text(encoding="utf-8"))
    expected = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    assert glm.special_ids == expected
    assert glm.vocab_size == 151329 + len(GLM4_SPECIALS)


def test_corpus_documents_identical_ids_and_text(glm: GLMTokenizer, ref, docs: tuple[str, ...]) -> None:
    expected = ref.encode_ordinary_batch(list(docs))
    ours = glm.encode_batch(list(docs))
    for i, (a, b) in enumerate(zip(expected, ours, strict=True)):
        assert a == b, f"document {i}: {first_difference(a, b)}"
    for i, ids in enumerate(ours):
        assert glm.decode(ids) == ref.decode(ids) == docs[i]


def test_whole_corpus_in_one_call(glm: GLMTokenizer, ref) -> None:
    """One 1 MB string: exercises the parallel chunked path against the unchunked oracle."""
    text = text_corpus.corpus_text()
    expected = ref.encode_ordinary(text)
    ours = glm.encode(text)
    assert ours == expected, first_difference(expected, ours)
    assert glm.decode(ours) == text


def test_chunk_boundaries_adversarial(glm: GLMTokenizer, ref) -> None:
    """Long texts whose every newline-before-a-letter sits after whitespace, punctuation or digits."""
    rng = random.Random(7)
    lead = [" ", "  ", "\t", ".", "!!", "'", "'s", "3", " \r", "\u3000", "x", "中", "\r\n", "\n\n", " \n "]
    parts = []
    for _ in range(30_000):
        parts.append(rng.choice(lead) + "\n" + rng.choice(["a", "Zz", "中文", "b c", "'s", "x\n"]))
    text = "".join(parts)
    assert len(text) > 4 * 32_768
    assert glm.encode(text) == ref.encode_ordinary(text)


def test_edge_cases_and_lone_surrogates(glm: GLMTokenizer, ref) -> None:
    for text in EDGE_CASES:
        assert glm.encode(text) == ref.encode_ordinary(text), repr(text)
    assert glm.encode_batch(list(EDGE_CASES)) == [ref.encode_ordinary(t) for t in EDGE_CASES]


def test_every_single_token_string(glm: GLMTokenizer, ref) -> None:
    n = ref.max_token_value + 1 - len(GLM4_SPECIALS)
    assert n == 151329
    token_bytes = [ref.decode_single_token_bytes(i) for i in range(n)]
    for i in range(0, n, 997):  # decoding each id alone: replacement characters like tiktoken's
        assert glm.decode([i]) == ref.decode([i]), i
    texts = []
    for b in token_bytes:
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    assert len(texts) > 140_000
    assert glm.encode_batch(texts) == ref.encode_ordinary_batch(texts, num_threads=2)


def test_decode_of_random_ids_including_invalid_utf8(glm: GLMTokenizer, ref) -> None:
    rng = random.Random(11)
    special_ids = list(range(151329, 151343))
    for _ in range(300):
        ids = [rng.randrange(151329) for _ in range(rng.randint(1, 30))]
        ids += rng.sample(special_ids, rng.randint(0, 2))
        rng.shuffle(ids)
        assert glm.decode(ids) == ref.decode(ids)
        plain = [i for i in ids if i < 151329]
        assert glm.decode(ids, skip_special_tokens=True) == ref.decode(plain)


def test_special_token_text_is_plain_unless_allowed(glm: GLMTokenizer, ref) -> None:
    text = "hi <|user|> [gMASK]<sop>\n<|assistant|>x<|endoftext|>"
    plain = glm.encode(text)
    assert plain == ref.encode(text, disallowed_special=())
    assert not set(plain) & set(glm.special_ids.values())
    assert glm.encode(text, allow_special=True) == ref.encode(text, allowed_special="all")
    assert glm.encode_batch([text, "x"], allow_special=True) == ref.encode_batch([text, "x"], allowed_special="all")


def test_nihao_through_the_chat_template(glm: GLMTokenizer) -> None:
    # The documented ids for one user turn "你好" plus the generation prompt (docs/glm4-model.md).
    assert glm.apply_chat_template([{"role": "user", "content": "你好"}]) == [
        151331,
        151333,
        151336,
        198,
        109377,
        151337,
    ]


def _write_ranks(path: Path, tokens: list[bytes]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


def test_short_ranks_file_keeps_real_special_ids(tmp_path: Path) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

    byte_order = list(hf_bytes_to_unicode())
    tokens = [bytes([b]) for b in byte_order] + [
        b"he",
        b"ll",
        b"hell",
        b"hello",
        b" w",
        b" wor",
        b"ld",
        b" world",
    ]
    model = tmp_path / "tokenizer.model"
    _write_ranks(model, tokens)
    write_tokenizer_json(model, tmp_path / "tokenizer.json")
    glm = GLMTokenizer.from_dir(tmp_path)
    assert glm.special_ids == {token: 151329 + i for i, token in enumerate(GLM4_SPECIALS)}
    ref = tiktoken_reference(model)
    for text in ("hello world", "hellohello  worlds\n", "<|user|>hello", "你好"):
        assert glm.encode(text) == ref.encode_ordinary(text)
    assert glm.encode("<|user|>hello", allow_special=True) == ref.encode("<|user|>hello", allowed_special="all")
    assert glm.decode([151336, len(byte_order) + 3]) == "<|user|>hello"
    assert glm.vocab_size == 151343
    decoder = glm.stream_decoder(skip_special_tokens=False)
    assert decoder.extend([151336, len(byte_order) + 3, 1000]) + decoder.finish() == "<|user|>hello"


def test_bad_ranks_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(TokenizerFileError, match="not found"):
        convert_tiktoken_file(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerFileError, match=r"bad\.model:2"):
        convert_tiktoken_file(bad)
    bad.write_text("IQ== 0\nIQ== 1\n")
    with pytest.raises(TokenizerFileError, match="duplicate"):
        convert_tiktoken_file(bad)
    bad.write_text("IQ== 0\n")
    with pytest.raises(TokenizerFileError, match="256 single bytes"):
        convert_tiktoken_file(bad)


def test_write_is_atomic_and_keeps_old_file_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    out.write_text("previous")
    bad = tmp_path / "bad.model"
    bad.write_text("garbage\n")
    with pytest.raises(TokenizerFileError):
        write_tokenizer_json(bad, out)
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model", "tokenizer.json"]


def test_from_dir_without_tokenizer_json_explains(tmp_path: Path) -> None:
    with pytest.raises(TokenizerFileError, match="text input needs a tokenizer"):
        GLMTokenizer.from_dir(tmp_path)


def test_input_validation(glm: GLMTokenizer) -> None:
    with pytest.raises(TypeError, match="not str"):
        glm.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text 1"):
        glm.encode_batch(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="non-negative ints"):
        glm.decode([1, -2])
    assert glm.decode([151500]) == ""  # inside the model's padded vocab, no token: skipped like tokenizers


def test_transformers_fast_tokenizer_loads_our_json(glm: GLMTokenizer, chat_reference: Path, docs) -> None:
    """Downstream users load tokenizer.json with transformers: same ids, specials recognised."""
    transformers = pytest.importorskip("transformers")
    directory = converted_tokenizer_dir(chat_reference)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    ref = tiktoken_reference(chat_reference / "tokenizer.model")
    sample = [d for d in docs[:60] if not any(special in d for special in GLM4_SPECIALS)]
    assert len(sample) > 10
    assert [fast.encode(d, add_special_tokens=False) for d in sample] == ref.encode_ordinary_batch(sample)
    assert fast.convert_tokens_to_ids("<|assistant|>") == 151337


def test_runtime_modules_import_nothing_heavy() -> None:
    """The runtime's tokenizer side may not pull in torch, transformers, onnx, glm_export (nor the oracle)."""
    import subprocess
    import sys

    code = (
        "import sys, glm_runtime.tokenizer, glm_runtime.chat_template, glm_runtime.tool_calls, "
        "glm_runtime.detokenize\n"
        "bad = {'torch', 'transformers', 'onnx', 'glm_export', 'tiktoken'} & set(sys.modules)\n"
        "assert not bad, bad"
    )
    env = {"PYTHONPATH": ":".join(sys.path), "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
