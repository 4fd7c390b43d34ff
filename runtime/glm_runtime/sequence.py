"""What the scheduler's users hold: a :class:`Sequence` (one generation: prompt, settings, the tokens so far and
why it ended), the :class:`Listener` that receives its tokens, the scheduler's counters (:class:`Stats`) and its
refusals. Kept apart from :mod:`glm_runtime.scheduler` (which re-exports them) so the engine loop reads on its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from glm_runtime.logprobs import TokenLogprob
from glm_runtime.prefix_cache import Block
from glm_runtime.sampling import Sampler, SamplingParams


class QueueFullError(RuntimeError):
    """Every row is busy and the wait queue is full: retry later (HTTP 429)."""


class SchedulerClosedError(RuntimeError):
    """The scheduler is shutting down and takes no new sequences (HTTP 503)."""


class Listener(Protocol):
    """Receives a sequence's tokens. Called from the engine thread (``on_finish`` also from the thread that
    cancels a queued sequence or closes the scheduler); keep it quick, it runs between decode steps."""

    def on_token(self, seq: Sequence, token: int) -> bool:
        """A new token (already in ``seq.output``); return ``True`` to end the sequence now (a stop string)."""
        ...

    def on_finish(self, seq: Sequence) -> None:
        """Called exactly once, after the last ``on_token``; ``seq.finish_reason`` is set."""
        ...


@dataclass(eq=False)
class Sequence:
    """One sequence in the scheduler. ``finish_reason``: stop, length, cancelled, error (``error`` says why)."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))
    stop_ids: frozenset[int] = frozenset()
    listener: Listener | None = None
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    row: int = -1
    prefilled: int = 0
    t_submit: float = 0.0
    t_first_token: float | None = None
    t_end: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False
    sampler: Sampler | None = None
    #: Prompt tokens whose K/V came from the prefix cache (not prefilled), and whether the whole prefill was
    #: shared with an identical prompt of the same submit (n > 1).
    cached: int = 0
    shared: bool = False
    #: Same-prompt sequences of the same submit that join when this one's prefill ends (and their leader).
    followers: list[Sequence] = field(default_factory=list)
    leader: Sequence | None = None
    chain: list[Block] = field(default_factory=list, repr=False)
    #: ``logprobs``: top candidates to report per generated token (``None``: no logprobs); ``prompt_logprobs``:
    #: the same for every prompt token after the first (needs logits at every prompt position: no prefix cache).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list, repr=False)
    prompt_logprob_values: list[TokenLogprob] = field(default_factory=list, repr=False)
    #: Constrained decoding (:class:`glm_runtime.grammar.Constraint`): masks the logits before each sample.
    constraint: Any = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """Slots of this sequence's row holding valid K/V (the last output token's is written next step)."""
        return len(self.prompt) + len(self.output) - 1 if self.output else self.prefilled

    @property
    def needed(self) -> int:
        """Cache slots the sequence may use by its end."""
        return len(self.prompt) + self.max_new_tokens

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


@dataclass
class Stats:
    """Counters for ``/metrics`` (monotonic, except the gauges the scheduler reads live)."""

    submitted: int = 0
    rejected: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps (mean batch = decode_rows / decode_steps)
    prefill_calls: int = 0
    ttft_seconds_sum: float = 0.0
    ttft_count: int = 0
    queue_seconds_sum: float = 0.0
    resizes: int = 0
    engine_errors: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run through the engine
    shared_prefill_tokens: int = 0  # prompt tokens of n > 1 siblings taken from their leader's row
    grammar_tokens: int = 0  # tokens sampled under a grammar mask
    grammar_seconds: float = 0.0  # time computing and applying those masks
