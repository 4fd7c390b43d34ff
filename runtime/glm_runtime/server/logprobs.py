"""``logprobs`` in OpenAI's two wire formats: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` and
the legacy completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` (with ``echo``: prompt tokens
first, the first of them ``None`` as OpenAI's and vLLM's). The numbers come from :mod:`glm_runtime.logprobs`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from glm_runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from glm_runtime.server.choices import Choice
from glm_runtime.server.errors import APIError


class TokenStrings:
    """Token id -> (text, bytes), cached. A token that is part of a UTF-8 character shows as U+FFFD in the
    text (its ``bytes`` are exact, as OpenAI's); without a tokenizer a token is ``token_id:N`` (as vLLM's)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._bytes = tokenizer.id_to_bytes if tokenizer is not None else None  # a cached property
        self._cache: dict[int, tuple[str, list[int] | None]] = {}

    def __call__(self, token: int) -> tuple[str, list[int] | None]:
        hit = self._cache.get(token)
        if hit is None:
            if self.tokenizer is None:
                hit = (f"token_id:{token}", None)
            else:
                raw = self._bytes[token] if 0 <= token < len(self._bytes) else None
                hit = ((raw.decode("utf-8", errors="replace"), list(raw)) if raw is not None
                       else (self.tokenizer.decode([token]), None))
            self._cache[token] = hit
        return hit


def check_top(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", param=param,
                       code="invalid_value")


def chat_entries(entries: Iterable[TokenLogprob], strings: TokenStrings) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        text, raw = strings(e.token)
        top = []
        for tok, lp in e.top:
            t, b = strings(tok)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(entries: Iterable[TokenLogprob | int], strings: TokenStrings,
                        offset: int = 0) -> dict[str, Any]:
    """The legacy format; an ``int`` entry is a token without a logprob (the prompt's first)."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        token = e if isinstance(e, int) else e.token
        text, _ = strings(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if isinstance(e, int):
            values.append(None)
            tops.append(None)
        else:
            values.append(e.logprob)
            top: dict[str, float] = {}
            for tok, lp in e.top:
                top.setdefault(strings(tok)[0], lp)
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def generated(choice: Choice, upto: int | None = None) -> list[TokenLogprob]:
    """Entries of the choice's generated tokens (the final stop id, which is no text, left out), from
    ``choice.sent`` to ``upto`` (default: all); marks them sent."""
    seq = choice.seq
    stop = upto if upto is not None else len(seq.output_logprobs)
    entries = [e for e in seq.output_logprobs[choice.sent:stop] if e.token not in seq.stop_ids]
    choice.sent = max(choice.sent, stop)
    return entries


def echo_text(llm: Any, prompt: Any, ids: list[int]) -> str:
    """What ``echo`` puts before the answer: a text prompt as given, token ids decoded (special tokens shown, so
    echo + answer is what the model read); nothing without a tokenizer (the ids are in ``logprobs.tokens``)."""
    if isinstance(prompt, str):
        return prompt
    return llm.tokenizer.decode(ids) if llm.tokenizer is not None else ""
