"""Sampling and text helpers of the runtime, against transformers' logits processors (the independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from glm_export import numerics
from glm_runtime.api import AssistantText, StopStrings
from glm_runtime.sampling import Sampler, SamplingParams


def hf_probs(logits: np.ndarray, seen: list[int], p: SamplingParams) -> np.ndarray:
    """The distribution transformers samples from, with its processors in generate()'s order."""
    scores = torch.from_numpy(logits.astype(np.float32))[None]
    ids = torch.tensor([seen], dtype=torch.long)
    if p.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return torch.softmax(scores.double(), -1)[0].numpy()


CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.8, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=40),
    SamplingParams(temperature=0.8, top_p=0.6, top_k=50),
    SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.3),
]


@pytest.mark.parametrize("params", CASES, ids=repr)
@pytest.mark.parametrize("vocab", [300, 20_000])
def test_distribution_matches_transformers(params: SamplingParams, vocab: int) -> None:
    # A heavy-tailed logit vector: at 20k tokens top-p must widen its candidate set several times.
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    seen = rng.choice(vocab, 30, replace=False).tolist()
    sampler = Sampler(params, 1, vocab)
    sampler.observe(0, seen)
    ours = sampler.probabilities(logits)
    ref = hf_probs(logits, seen, params)
    assert ((ours > 0) == (ref > 0)).all(), "kept token sets differ"
    # Softmax normalises by a float32 sum over the vocabulary: relative error <= numerics.sum_rtol(vocab) per
    # probability, plus that of one exp and one division (in ELEMENTWISE_ULPS).
    np.testing.assert_allclose(ours, ref, atol=0, rtol=2 * numerics.sum_rtol(vocab))
    if params.top_p < 1 and not params.top_k and vocab > 1000:
        assert (ref > 0).sum() > 256, "the test should exercise top-p's candidate widening"


def test_draws_follow_the_distribution_and_seed_reproduces() -> None:
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))
    params = SamplingParams(temperature=1.0, top_p=0.85, seed=7)
    ref = hf_probs(logits, [], params)
    sampler = Sampler(params, 1, 5)
    draws = [int(sampler(logits.copy()[None])[0]) for _ in range(20_000)]
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, ref, atol=0.015)
    again = Sampler(params, 1, 5)
    assert [int(again(logits.copy()[None])[0]) for _ in range(200)] == draws[:200]
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.85, seed=8), 1, 5)
    assert [int(other(logits.copy()[None])[0]) for _ in range(200)] != draws[:200]


def test_greedy_and_penalty_in_greedy_mode() -> None:
    logits = np.array([[1.0, 3.0, 2.9, -1.0], [0.5, -2.0, 0.1, 0.4]], np.float32)
    assert Sampler(SamplingParams(temperature=0), 2, 4)(logits.copy()).tolist() == [1, 0]
    penal = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), 2, 4)
    penal.observe(0, [1])
    penal.observe(1, [0])
    # row 0: 3.0/1.5 = 2.0 < 2.9; row 1: 0.5/1.5 = 0.33 < 0.4
    assert penal(logits.copy()).tolist() == [2, 3]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(repetition_penalty=0), dict(seed=-1), dict(temperature=float("nan"))])
def test_bad_sampling_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_stop_strings_hold_back_only_what_may_still_match() -> None:
    text = "one two three four"
    for cut in range(1, len(text)):  # every way of splitting the stream in two
        m = StopStrings([" three", "xyz"])
        a, hit = m.feed(text[:cut])
        if not hit:  # after a match the row ends: nothing more is fed
            b, hit = m.feed(text[cut:])
            a += b
        assert a == "one two" and hit
    m = StopStrings(["END"])
    out = [m.feed(piece) for piece in ["abc E", "N", "x", "yz"]]
    assert [o[0] for o in out] == ["abc ", "", "ENx", "yz"] and not any(o[1] for o in out)


def test_assistant_text_splits_metadata_from_content() -> None:
    def run(pieces: list[str], tools: set[str]) -> tuple[str, str]:
        a = AssistantText(tools)
        return "".join(a.feed(p) for p in pieces) + a.finish(), a.mode

    assert run(["\n", "Hello", " world"], {"get_weather"}) == ("Hello world", "text")
    assert run(["get_", "weather", "\n{", '"a": 1}'], {"get_weather"}) == ("", "tool")
    assert run(["get", " lost\n", "x"], {"get_weather"}) == ("get lost\nx", "text")  # not a tool name
    assert run(["Sure", "!"], set()) == ("Sure!", "text")
