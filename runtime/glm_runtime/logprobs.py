"""Log-probabilities of tokens under the engine's logits: what ``logprobs`` / ``top_logprobs`` / ``echo`` return.

The values are the log-softmax of the model's raw logits (before repetition penalty, temperature, top-k/p or a
grammar mask), as OpenAI's and vLLM's defaults: they describe the model, not the sampler's settings, so a client
that scores text (lm-evaluation-harness) gets the same numbers whatever it samples with.

Per position: one max, one exp and a float64 sum over the vocabulary (~0.3 ms for GLM-4's 151552 on one core),
and a partial sort for the top candidates; only paid by requests that ask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: OpenAI's bound on ``top_logprobs`` (chat) and the one this runtime applies to ``logprobs`` (completions).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the chosen token's log-probability and the ``top`` most likely tokens (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """``logsumexp`` over the last axis, float64 (a float32 sum over 151552 terms would lose ~1e-4 relative)."""
    z = np.asarray(logits, np.float32)
    m = z.max(axis=-1, keepdims=True)
    s = np.exp(z - m).sum(axis=-1, dtype=np.float64)
    return m[..., 0].astype(np.float64) + np.log(s)


def token_logprobs(logits: np.ndarray, tokens: np.ndarray | list[int], top: int) -> list[TokenLogprob]:
    """For each row ``i`` of ``logits [n, vocab]``: ``tokens[i]``'s log-probability and the ``top`` best."""
    z = np.asarray(logits, np.float32).reshape(-1, logits.shape[-1])
    lse = log_normalizer(z)
    ids = np.asarray(tokens, np.int64)
    chosen = z[np.arange(len(ids)), ids].astype(np.float64) - lse
    out = []
    for i, tok in enumerate(ids.tolist()):
        best: tuple[tuple[int, float], ...] = ()
        if top > 0:
            cand = np.argpartition(z[i], -top)[-top:]
            cand = cand[np.argsort(-z[i, cand], kind="stable")]
            best = tuple((int(c), float(z[i, c] - lse[i])) for c in cand)
        out.append(TokenLogprob(int(tok), float(chosen[i]), best))
    return out
