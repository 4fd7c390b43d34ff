"""Next-token choice in numpy: greedy, or temperature / top-k / top-p sampling with a repetition penalty.

The order and the meaning of each knob are those of transformers' logits processors (repetition penalty,
then temperature, top-k, top-p), so settings from a model card mean the same here. Written by hand because
the runtime may not import torch/transformers, and numpy has no sampling "warpers"; the tests hold it against
transformers' own processors.

Per token the cost is a few passes over the vocabulary (argmax, or max/exp/sum), never a Python loop over it.
Top-p avoids sorting 151552 logits: it sorts only the best few hundred candidates, widening the set until it
holds the requested mass (exact, not an approximation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: The largest 1/temperature applied (float32 logits: larger factors only risk overflow, never change the draw).
MAX_INV_TEMPERATURE = 1e30

FLOAT32_MAX = float(np.finfo(np.float32).max)

#: First candidate-set size for top-p; widened x8 until it holds ``top_p`` of the mass.
TOP_P_FIRST_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` (or ``top_k == 1``) means greedy. ``seed`` makes sampling reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Chooses the next token of each of ``batch`` rows; owns the per-row random streams and penalty state."""

    def __init__(self, params: SamplingParams, batch: int, vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        # One independent stream per row: a row's draws don't depend on how many rows share the batch.
        self._rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(params.seed).spawn(batch)]
        self._seen = np.zeros((batch, vocab_size), bool) if params.repetition_penalty != 1 else None
        self._scratch = np.empty(vocab_size, np.float32)

    def observe(self, row: int, token_ids: Iterable[int]) -> None:
        """Tokens that count as "already present" for the repetition penalty (prompt, then each output)."""
        if self._seen is not None:
            ids = np.fromiter(token_ids, np.int64)
            self._seen[row, ids[(ids >= 0) & (ids < self.vocab_size)]] = True

    def __call__(self, logits: np.ndarray, rows: Iterable[int] | None = None) -> np.ndarray:
        """Next token per row of ``logits [batch, vocab]`` (modified in place by the repetition penalty).

        ``rows`` limits the work to the rows still generating; other entries of the result are 0.
        """
        batch = logits.shape[0]
        rows = range(batch) if rows is None else rows
        if self._seen is not None:
            for b in rows:
                self._apply_penalty(logits[b], b)
        if self.params.greedy:
            return logits.argmax(axis=-1)
        out = np.zeros(batch, np.int64)
        for b in rows:
            out[b] = self._sample_row(logits[b], self._rngs[b])
        return out

    def _apply_penalty(self, z: np.ndarray, row: int) -> None:
        assert self._seen is not None
        ids = np.flatnonzero(self._seen[row])
        if ids.size:
            s = z[ids]
            p = self.params.repetition_penalty
            # Clipped to finite: an extreme penalty (1e-300, 1e300) overflowed to +-inf, and inf - inf = NaN later.
            with np.errstate(over="ignore", divide="ignore"):
                z[ids] = np.clip(np.where(s < 0, s * p, s / p), -FLOAT32_MAX, FLOAT32_MAX)

    def probabilities(self, logits: np.ndarray, row: int = 0) -> np.ndarray:
        """The full distribution row ``row`` would be sampled from (penalty, temperature, top-k, top-p applied).

        Not used when decoding (it is dense); it states what :meth:`__call__` draws from, for tests and tools.
        """
        z = np.array(logits, np.float32)
        if self._seen is not None:
            self._apply_penalty(z, row)
        probs = np.zeros(z.size, np.float64)
        if self.params.greedy:
            probs[int(z.argmax())] = 1.0
            return probs
        cand, weights = self._candidates(z)
        if cand is None:
            return weights / weights.sum(dtype=np.float64)
        probs[cand] = weights / weights.sum(dtype=np.float64)
        return probs

    def _candidates(self, z: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """``(token ids or None for all, unnormalised weights)`` to draw from (``z`` itself is left as it is)."""
        p = self.params
        w = self._scratch
        with np.errstate(over="ignore"):  # overflow to -inf only ever means weight 0, never NaN: z is finite
            np.subtract(z, z.max(), out=w)  # first: scaling first turned z into +-inf for T near 0; inf - inf = NaN
            if p.temperature != 1:
                # Capped: 1/T overflows for T < ~1e-308 (and float32 beyond 1e38); with the cap, every token not
                # tied with the best gets weight 0 for any T this small, which is what "near-greedy" means.
                np.multiply(w, np.float32(MAX_INV_TEMPERATURE if p.temperature < 1 / MAX_INV_TEMPERATURE
                                          else 1.0 / p.temperature), out=w)
        np.exp(w, out=w)  # unnormalised probabilities; exp(0) = 1 for the best token
        if p.top_k and p.top_k < w.size:
            cand = np.argpartition(w, -p.top_k)[-p.top_k:]
            mass = float(w[cand].sum(dtype=np.float64))
        elif p.top_p < 1:
            mass = float(w.sum(dtype=np.float64))  # top-p is relative to the whole distribution
            k = min(TOP_P_FIRST_CANDIDATES, w.size)
            while True:
                cand = np.argpartition(w, -k)[-k:] if k < w.size else np.arange(w.size)
                if k == w.size or float(w[cand].sum(dtype=np.float64)) >= p.top_p * mass:
                    break
                k = min(8 * k, w.size)
        else:  # plain temperature sampling over the whole vocabulary
            return None, w
        cw = w[cand]
        order = np.argsort(-cw, kind="stable")
        cand, cw = cand[order], cw[order]
        if p.top_p < 1:
            # Keep the smallest prefix whose mass reaches top_p (transformers: drop tokens whose ascending
            # cumulative probability is <= 1 - top_p, always keeping the best one).
            keep = int(np.searchsorted(np.cumsum(cw, dtype=np.float64) / mass, p.top_p, side="left")) + 1
            cand, cw = cand[:keep], cw[:keep]
        return cand, cw

    def _sample_row(self, z: np.ndarray, rng: np.random.Generator) -> int:
        cand, weights = self._candidates(z)
        cum = np.cumsum(weights, dtype=np.float64)
        i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), cum.size - 1)
        return i if cand is None else int(cand[i])
