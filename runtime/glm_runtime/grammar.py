"""Constrained decoding: a grammar (JSON schema, or a Lark grammar embedding JSON schemas) masks the logits
before each token is sampled, so the answer cannot leave it (``response_format`` json_object / json_schema,
``tool_choice`` required / named).

Library: llguidance (Microsoft's Rust engine behind Guidance; also used by vLLM, SGLang and llama.cpp). Chosen by
measured per-token mask time with GLM-4's 151552-token vocabulary on this runtime's CPU (scripts/bench_grammar.py,
numbers in docs/server.md): it was the fastest of the three maintained engines on PyPI, compiles a schema in
milliseconds (outlines-core needs seconds per schema), and needs neither torch nor a GPU (xgrammar's Python
package needs torch, which the runtime must not import).

The mask is applied to the logits in the scheduler's engine thread, after the engine step and before the
sampler, so every engine (ONNX Runtime, TensorRT) and every sampling setting gets it alike; logprobs are taken
from the raw logits before it (they describe the model, not the constraint).

llguidance is the optional ``structured`` extra (``pip install 'glm-runtime[structured]'``, also in ``server``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile (HTTP 400), or llguidance is not installed."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs llguidance: pip install 'glm-runtime[structured]'") from None
    return llguidance


def json_schema_lark(schema: Mapping[str, Any]) -> str:
    """A Lark fragment matching one JSON value of ``schema`` (llguidance's ``%json`` extension).

    Compact JSON (no whitespace between tokens) unless the schema's own ``x-guidance`` options say otherwise:
    with free whitespace a weak model can spend its whole budget on blanks inside an object."""
    options = {"whitespace_flexible": False, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def chat_json_grammar(schema: Mapping[str, Any] | None) -> str:
    """A GLM-4 text answer (an empty metadata line, then the content) whose content is JSON of ``schema`` (any
    object for ``json_object``)."""
    return f'start: "\\n" body\nbody: {json_schema_lark(schema or {"type": "object"})}\n'


def tool_call_grammar(tools: Mapping[str, Mapping[str, Any]], forced: str | None) -> str:
    """A GLM-4 tool call: ``name\\n{arguments}`` with the arguments valid for that tool's ``parameters`` schema.
    With ``forced`` the name is already in the prompt (only the arguments are generated); otherwise the answer
    must start with one of the tools' names (``tool_choice: "required"``)."""
    if forced is not None:
        return f"start: {json_schema_lark(tools[forced] or {'type': 'object'})}\n"
    rules, alts = [], []
    for i, (name, params) in enumerate(tools.items()):
        alts.append(f"{json.dumps(name + chr(10))} args{i}")
        rules.append(f"args{i}: {json_schema_lark(params or {'type': 'object'})}")
    return "start: " + " | ".join(alts) + "\n" + "\n".join(rules) + "\n"


class Constraint:
    """One sequence's grammar state: :meth:`apply` masks a logits row in place, :meth:`consume` advances."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, np.int32)
        self._allowed = np.empty(vocab_size, bool)

    def apply(self, logits: np.ndarray) -> bool:
        """Set the logits of tokens the grammar forbids to -inf; ``False`` if it allows none (an error state)."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little", count=self.vocab_size)
        np.not_equal(bits, 0, out=self._allowed)
        if not self._allowed.any():
            return False
        np.copyto(logits[:self.vocab_size], -np.inf, where=~self._allowed)
        return True

    def consume(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and takes no more tokens (the sequence ends here)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


class GrammarCompiler:
    """llguidance's view of one tokenizer (built once, on first use: about a second for GLM-4's vocabulary),
    and matchers compiled from grammars against it. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, list(stop_ids)
        self._lltok: Any = None
        self._lock = threading.Lock()
        self.build_seconds = 0.0

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                llg = _llguidance()
                t0 = time.perf_counter()
                # The tokenizers JSON itself: llguidance reads the same BPE the runtime encodes with.
                self._lltok = llg.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                              eos_token=self.stop_ids)
                self.build_seconds = time.perf_counter() - t0
            return self._lltok

    def constraint(self, lark: str) -> Constraint:
        """A fresh :class:`Constraint` for ``lark``; raises :class:`GrammarError` with llguidance's message."""
        llg = _llguidance()
        lltok = self._ll_tokenizer()
        grammar = llg.LLMatcher.grammar_from_lark(lark)
        error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if error:
            raise GrammarError(f"the schema cannot be used for constrained decoding: {messages[0]}")
        matcher = llg.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the schema cannot be used for constrained decoding: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)
