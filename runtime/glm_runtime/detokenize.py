"""Streaming detokenization: generated ids in, finished text out, one id at a time.

Byte-level BPE splits a Chinese character or an emoji over several tokens, so the text of one token is often
not a whole character. ``tokenizers.decoders.DecodeStream`` handles that by re-decoding a window and holding
back while the text ends in U+FFFD, which cannot tell "incomplete, more bytes coming" from "invalid bytes" and
so never flushes a genuinely invalid sequence until later text arrives. This class instead concatenates the
tokens' bytes and runs Python's incremental UTF-8 decoder (``errors="replace"``), which holds back exactly the
bytes of an unfinished character and replaces invalid bytes the way a one-shot decode does: the
concatenated output equals ``decode(ids)`` after :meth:`StreamDecoder.finish`.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


class StreamDecoder:
    """Incremental decoder: :meth:`step` takes one id and returns the text it completes (maybe ``""``).

    ``id_to_bytes`` maps each id to its bytes (``None`` for ids without a token, which are skipped as the
    one-shot decode skips them). Special ids decode to their text unless ``skip_special_tokens``.
    """

    def __init__(
        self,
        id_to_bytes: Sequence[bytes | None],
        special_ids: Iterable[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._table = id_to_bytes
        self._special = frozenset(special_ids)
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []

    def step(self, token_id: int) -> str:
        """Feed one generated id; return the newly completed text (never part of a character)."""
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise TypeError(f"token ids must be non-negative ints, got {token_id!r}")
        self.ids.append(token_id)
        if self.skip_special_tokens and token_id in self._special:
            return ""
        data = self._table[token_id] if token_id < len(self._table) else None
        if not data:
            return ""
        return self._utf8.decode(data)

    def extend(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; the text they complete."""
        return "".join(self.step(i) for i in token_ids)

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an unfinished character held back (empty when the output is complete so far)."""
        return bytes(self._utf8.getstate()[0])

    def finish(self) -> str:
        """End of generation: held-back bytes that never became a character come out as U+FFFD."""
        return self._utf8.decode(b"", final=True)
