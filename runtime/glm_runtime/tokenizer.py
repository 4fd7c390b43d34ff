"""GLM-4's tokenizer on the `tokenizers` library, converted from the checkpoint's tiktoken ranks file.

GLM-4 ships its vocabulary as a tiktoken ``tokenizer.model`` and a remote-code Python tokenizer. The runtime
may not run remote code nor import transformers, so the ranks file is converted once into a ``tokenizer.json``
(byte-level BPE + GLM-4's split regex) that the Rust ``tokenizers`` library loads and runs quickly.

Written by hand here, and why:
- the rank -> merges derivation: transformers' ``TikTokenConverter`` does it, but the runtime may not import
  transformers; the algorithm (every split of a token into two vocabulary pieces, ordered by the token's rank)
  is the same, so ``tokenizers``' BPE picks the same pairs tiktoken's rank-ordered merging picks;
- GPT-2's byte -> unicode table (``bytes_to_unicode``): ``tokenizers`` exposes the alphabet, not the mapping;
- special-token handling: ``tokenizers`` matches added tokens in any input text, which would let a user forge
  ``<|assistant|>`` turns; encoding plain text therefore sets ``encode_special_tokens`` (specials are ordinary
  text) and ``allow_special=True`` splits on special tokens itself, as tiktoken's ``allowed_special`` does.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from glm_runtime.chat_template import ChatTemplateError, render_chat_template
from glm_runtime.detokenize import StreamDecoder

#: GLM-4's pre-tokenization regex (from its ``tokenization_chatglm.py``; also ``docs/tokenizer.md``).
GLM4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Special tokens in id order; the first one's id is :data:`FIRST_SPECIAL_ID`.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

#: GLM-4's ranks file holds ranks 0..151328; the special tokens follow it, whatever size the ranks file has.
FIRST_SPECIAL_ID = 151329


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed; the message says which file and what to do."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table; byte-level BPE vocabularies use it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tiktoken_ranks(tokenizer_model: Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file (``base64(token bytes) rank`` per line), checking it as it goes."""
    path = Path(tokenizer_model)
    if not path.is_file():
        raise TokenizerFileError(f"tiktoken ranks file not found: {path} (GLM-4 checkpoints call it tokenizer.model)")
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise TokenizerFileError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}")
            try:
                token = base64.b64decode(fields[0], validate=True)
                rank = int(fields[1])
            except (binascii.Error, ValueError) as exc:
                raise TokenizerFileError(f"{path}:{lineno}: not 'base64 rank': {exc}") from exc
            if token in ranks or rank in seen_ranks:
                raise TokenizerFileError(f"{path}:{lineno}: duplicate token or rank {rank}")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise TokenizerFileError(f"{path} holds no ranks")
    if max(seen_ranks) >= FIRST_SPECIAL_ID:
        raise TokenizerFileError(
            f"{path}: rank {max(seen_ranks)} collides with GLM-4's special ids ({FIRST_SPECIAL_ID}+)"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(f"{path}: byte-level BPE needs all 256 single bytes; missing {missing[:8]}")
    return ranks


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-ordered merging.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A merge list
    reproduces that when every way of writing a token as two vocabulary pieces is a merge whose priority is
    the token's rank (ties between splits of one token: by the pieces' ranks, as transformers does).
    """
    found: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank = ranks.get(left)
            if left_rank is None:
                continue
            right_rank = ranks.get(right)
            if right_rank is not None:
                found.append((rank, left_rank, right_rank, left, right))
    found.sort(key=lambda m: m[:3])
    return [(left, right) for _, _, _, left, right in found]


def convert_tiktoken_ranks(ranks: Mapping[bytes, int]) -> Tokenizer:
    """GLM-4's byte-level BPE ``Tokenizer`` from tiktoken ranks (see :func:`convert_tiktoken_file`)."""
    to_unicode = bytes_to_unicode()

    def as_vocab_string(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {as_vocab_string(token): rank for token, rank in ranks.items()}
    # Specials also live in the model's vocabulary at their real ids: `tokenizers` gives an added token the
    # model's id for the same string, but numbers genuinely new ones from the vocabulary's size, which is
    # wrong whenever the ranks file is shorter than 151329. Byte-level pieces never spell these strings
    # (the split regex cuts "<|", "user", "|>" apart), so BPE never produces them from text.
    for offset, special in enumerate(SPECIAL_TOKENS):
        vocab[special] = FIRST_SPECIAL_ID + offset
    merges = [(as_vocab_string(a), as_vocab_string(b)) for a, b in derive_merges(ranks)]
    # ignore_merges: tiktoken maps a pre-token that is itself in the vocabulary straight to its rank, even
    # when merging could not reach it; BPE must look the whole word up first too.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    for offset, special in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(special) != FIRST_SPECIAL_ID + offset:  # a tokenizers behaviour change
            raise RuntimeError(f"{special} got id {tokenizer.token_to_id(special)}, not {FIRST_SPECIAL_ID + offset}")
    return tokenizer


def convert_tiktoken_file(tokenizer_model: Path) -> Tokenizer:
    """Convert GLM-4's ``tokenizer.model`` (tiktoken ranks) into a ``tokenizers.Tokenizer``."""
    return convert_tiktoken_ranks(load_tiktoken_ranks(tokenizer_model))


def _atomic_write_text(out_path: Path, text: str) -> None:
    """Write via a temp file in the same directory and ``os.replace``: a reader never sees half a file."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tokenizer_json(tokenizer_model: Path, out_path: Path) -> None:
    """Convert ``tokenizer.model`` and write ``tokenizer.json`` atomically."""
    _atomic_write_text(Path(out_path), convert_tiktoken_file(tokenizer_model).to_str(pretty=False))


def _clean_surrogates(text: str) -> str:
    """As tiktoken, for a str that isn't valid UTF-8 (lone surrogates): pair what pairs, replace the rest."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _private_use_markers(strings: Iterable[str]) -> tuple[str, str]:
    """Two private-use characters that occur in none of ``strings``, to build placeholders from."""
    joined = "".join(strings)
    for code in range(0xE000, 0xF8FF, 2):
        opener, closer = chr(code), chr(code + 1)
        if opener not in joined and closer not in joined:
            return opener, closer
    raise ValueError("every private-use character occurs in the conversation; cannot shield special tokens")


_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
#: Texts longer than this (characters) are encoded as parallel chunks.
_CHUNK_CHARS = 32_768
#: A newline followed by a letter: GLM-4's split regex always ends a piece there and starts the next at the
#: letter (no alternative crosses a newline into a letter, and the only lookahead, in ``\s+(?!\S)``, is never
#: reached inside a whitespace run that ends in a newline), so the text's pieces are the chunks' pieces.
_SAFE_CUT = re.compile(r"\n(?=[A-Za-z\u4e00-\u9fff])")


def _safe_chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters where pre-tokenization splits anyway."""
    chunks: list[str] = []
    start = 0
    while len(text) - start > size:
        match = _SAFE_CUT.search(text, start + size)
        if match is None:
            break
        chunks.append(text[start : match.end()])
        start = match.end()
    chunks.append(text[start:])
    return chunks


class GLMTokenizer:
    """GLM-4 tokenizer: exact ids (tiktoken-identical), chat template, streaming decode."""

    def __init__(self, tokenizer: Tokenizer, config: Mapping[str, Any] | None = None) -> None:
        self._tokenizer = tokenizer
        # Plain text never turns into special ids; `allow_special` handles them explicitly (module docstring).
        # This sets the flag on the given Tokenizer object itself.
        self._tokenizer.encode_special_tokens = True
        self.config: dict[str, Any] = dict(config or {})
        self.special_ids: dict[str, int] = {
            added.content: token_id
            for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
            if added.special
        }
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in sorted(self.special_ids, key=len, reverse=True)))
            if self.special_ids
            else None
        )

    @classmethod
    def from_dir(cls, directory: Path) -> GLMTokenizer:
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` (chat template)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerFileError(
                f"{path} not found: text input needs a tokenizer. Convert the checkpoint's tiktoken file with "
                f"glm_runtime.tokenizer.write_tokenizer_json(<checkpoint>/tokenizer.model, {path}), "
                "or pass token ids instead of text."
            )
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # also invalid UTF-8
                raise TokenizerFileError(f"{config_path} is not valid JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise TokenizerFileError(f"{config_path} must hold a JSON object")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception for any malformed file
            raise TokenizerFileError(f"{path} is not a tokenizers file this runtime can read ({exc}); rebuild the "
                                     "artifact or convert the tokenizer again") from None
        try:
            tokenizer = cls(backend, config)
            tokenizer.vocab_size  # noqa: B018  (an empty vocabulary fails here, not in the first request)
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenizerFileError(f"{path} is not a usable GLM-4 tokenizer ({type(exc).__name__}: {exc})") from None
        return tokenizer

    @cached_property
    def vocab_size(self) -> int:
        """Highest id with a token + 1, specials included (the model's embedding is padded beyond it)."""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        return template if isinstance(template, str) else None

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (plain-text mode: ``encode_special_tokens`` is set)."""
        return self._tokenizer

    def _plain(self, texts: list[str]) -> list[list[int]]:
        """Plain-text ids; long texts are cut at safe points and encoded in parallel (``_safe_chunks``)."""
        if not any(len(t) > _CHUNK_CHARS for t in texts):
            return self._plain_batch(texts)
        spans: list[tuple[int, int]] = []
        chunks: list[str] = []
        for text in texts:
            parts = _safe_chunks(text) if len(text) > _CHUNK_CHARS else [text]
            spans.append((len(chunks), len(chunks) + len(parts)))
            chunks.extend(parts)
        encoded = self._plain_batch(chunks)
        return [[i for part in encoded[a:b] for i in part] for a, b in spans]

    def _plain_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast: no offsets (a third of the cost for long texts) and Rust threads across texts.
        try:
            encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        except (TypeError, UnicodeEncodeError):  # lone surrogates: tokenizers refuses the str
            encodings = self._tokenizer.encode_batch_fast(
                [_clean_surrogates(t) for t in texts], add_special_tokens=False
            )
        return [e.ids for e in encodings]

    def _pieces(self, text: str) -> list[str | int]:
        """Split text into plain-text pieces and special ids (special strings become their ids)."""
        assert self._special_re is not None
        pieces: list[str | int] = []
        pos = 0
        for match in self._special_re.finditer(text):
            if match.start() > pos:
                pieces.append(text[pos : match.start()])
            pieces.append(self.special_ids[match.group()])
            pos = match.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads). ``allow_special`` as in :meth:`encode`."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
        if not allow_special or self._special_re is None:
            return self._plain(list(texts))
        return self._join([self._pieces(t) for t in texts])

    def _join(self, split: list[list[str | int]]) -> list[list[int]]:
        """Ids for texts already split into plain pieces and special ids; the plain pieces of all texts are
        encoded in one batch call."""
        plain = iter(self._plain([p for pieces in split for p in pieces if isinstance(p, str)]))
        return [[i for piece in pieces for i in ((piece,) if isinstance(piece, int) else next(plain))]
                for pieces in split]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``, without BOS-like prefixes (the chat template adds ``[gMASK]<sop>``).

        Special-token strings in ``text`` are ordinary text unless ``allow_special`` is true, so user input
        cannot forge turns.
        """
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}, not str")
        if allow_special and self._special_re is not None and self._special_re.search(text):
            return self.encode_batch([text], allow_special=True)[0]
        return self._plain([text])[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD (as in tiktoken); ids without a token are skipped."""
        ids = list(ids)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise TypeError(f"token ids must be non-negative ints, got {i!r}")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def id_to_bytes(self) -> list[bytes | None]:
        """Each id's bytes (None for ids without a token); what streaming decode concatenates."""
        to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        table: list[bytes | None] = [None] * self.vocab_size
        for token, token_id in self._tokenizer.get_vocab(with_added_tokens=False).items():
            if token not in self.special_ids:
                table[token_id] = bytes(to_byte[ch] for ch in token)
        for token_id, added in self._tokenizer.get_added_tokens_decoder().items():
            table[token_id] = added.content.encode("utf-8")
        return table

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for generated ids (see :class:`glm_runtime.detokenize.StreamDecoder`)."""
        return StreamDecoder(self.id_to_bytes, set(self.special_ids.values()), skip_special_tokens)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text the checkpoint's chat template makes of ``messages``."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat_template (tokenizer_config.json missing or without one); "
                "copy the checkpoint's tokenizer_config.json next to tokenizer.json"
            )
        # transformers also hands the template the special-token strings (eos_token, ...).
        tokens = {k: v for k, v in self.config.items() if k in _TEMPLATE_TOKEN_KEYS and isinstance(v, str)}
        return render_chat_template(self.chat_template, messages, tools, add_generation_prompt, **{**tokens, **extra})

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **extra: Any,
    ) -> list[int] | str:
        """Render ``messages`` with the checkpoint's chat template; ids when ``tokenize`` (the default).

        Only special tokens written by the template become special ids: a message (or tool description)
        containing e.g. the text ``<|user|>`` is encoded as that text. The rendered string
        (``tokenize=False``) cannot carry that distinction; don't re-encode it with ``allow_special``.
        """
        if not tokenize:
            return self.render_chat(messages, tools, add_generation_prompt, **extra)
        strings: list[str] = []
        _collect_strings([messages, tools, extra], strings)
        if self._special_re is None or not any(self._special_re.search(s) for s in strings):
            return self.encode(self.render_chat(messages, tools, add_generation_prompt, **extra), allow_special=True)
        # Replace special-token text inside the caller's data by placeholders, render, then split the prompt
        # on the template's own specials and put the text back before encoding it as plain text.
        opener, closer = _private_use_markers([*strings, self.chat_template or ""])
        originals: list[str] = []

        def shield(value: str) -> str:
            def sub(match: re.Match[str]) -> str:
                originals.append(match.group())
                return f"{opener}{len(originals) - 1}{closer}"

            assert self._special_re is not None
            return self._special_re.sub(sub, value)

        safe = _map_strings([messages, tools, extra], shield)
        rendered = self.render_chat(safe[0], safe[1], add_generation_prompt, **safe[2])
        restore = re.compile(re.escape(opener) + r"(\d+)" + re.escape(closer))
        pieces = [
            p if isinstance(p, int) else restore.sub(lambda m: originals[int(m.group(1))], p)
            for p in self._pieces(rendered)
        ]
        return self._join([pieces])[0]


def _collect_strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _collect_strings(k, out)
            _collect_strings(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_strings(v, out)


def _map_strings(value: Any, fn: Any) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value
