"""``glm-export eval``: held-out perplexity of an artifact or a checkpoint on raw text, optionally against a reference.

The measurement is the one ``llama-perplexity`` makes, so numbers can be compared with llama.cpp's:

- the text file is tokenized as plain text (no special tokens, no chat template) with the artifact's or
  checkpoint's own tokenizer;
- the token stream is cut into non-overlapping windows of ``ctx`` tokens (a shorter tail is dropped), each
  window evaluated from an empty cache;
- scored are the tokens after a window's first (``score="all"``), or only the second half of each window
  (``score="second-half"``: every scored token then sees at least ``ctx/2`` tokens of context, as
  ``llama-perplexity`` does);
- with a reference (another artifact or the PyTorch checkpoint), per scored position also KL(reference ||
  candidate) of the full next-token distributions, whether both pick the same top-1 token, and the change
  of perplexity, as ``llama-perplexity --kl-divergence`` reports them.

Log-probabilities are taken in float64 (see :mod:`glm_export.accuracy`: float32 would put a CPU-dependent
floor of ~1e-8 under the KL of an exact export). Candidate and reference are both loaded at once and
evaluated window by window, so memory is that of both models plus two ``ctx x vocab`` logit arrays.

Scorers: an artifact's ``model.onnx`` in plain ONNX Runtime (all positions of a window in one run), an
artifact's TensorRT engine through the runtime's engine (one token per step: the engine returns one position's
logits per row), or a checkpoint in PyTorch fp32 (:class:`glm_export.model.GLM4`, the numerical reference).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from glm_export.progress import count_progress

SCORE_CHOICES = ("all", "second-half")


class EvalError(ValueError):
    """Unusable eval input; the message says how to fix it."""


class Scorer(Protocol):
    """Full-vocabulary logits ``[n, vocab]`` (float32) of every position of one window, from an empty cache."""

    name: str
    vocab_size: int

    def logits(self, ids: list[int]) -> np.ndarray: ...


def is_artifact(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def is_checkpoint(path: Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or
                                              (p / "model.safetensors.index.json").is_file())


class OrtScorer:
    """``model.onnx`` of an artifact in plain ONNX Runtime on the CPU: one run per window, every position."""

    def __init__(self, artifact: Path, threads: int | None = None, cfg: Any = None) -> None:
        from glm_export.accuracy import cache_dtype
        from glm_export.validate import OrtGraph
        from glm_runtime.manifest import model_config, read_manifest

        self.cfg = cfg if cfg is not None else model_config(read_manifest(artifact, verify="size"))
        self.graph = OrtGraph(artifact, threads=threads)
        self.cache_dtype = cache_dtype(self.graph)
        self.name = f"{artifact} (ONNX Runtime)"
        self.vocab_size = self.cfg.vocab_size

    def logits(self, ids: list[int]) -> np.ndarray:
        n, cfg = len(ids), self.cfg
        cache = [np.zeros((1, cfg.num_kv_heads, n, cfg.head_dim), self.cache_dtype)
                 for _ in range(2 * cfg.num_layers)]
        ar = np.arange(n, dtype=np.int64)[None]
        out, _ = self.graph.step(np.array([ids], np.int64), ar, ar, cache)
        return np.asarray(out[0], np.float32)


class EngineScorer:
    """An artifact through the runtime's engine (TensorRT where a GPU exists): the engine hands back one
    position's logits per step, so a window is fed one token at a time (its own prefill would give only the
    last position)."""

    def __init__(self, artifact: Path, engine: Any) -> None:
        self.engine = engine
        self.cfg = engine.config
        self.name = f"{artifact} ({engine.describe()})"
        self.vocab_size = self.cfg.vocab_size

    def logits(self, ids: list[int]) -> np.ndarray:
        cache = self.engine.allocate(1, len(ids))
        rows = np.empty((len(ids), self.vocab_size), np.float32)
        idx = np.zeros((1, 1), np.int64)
        for i, tok in enumerate(ids):
            rows[i] = self.engine.step(cache, np.array([[tok]], np.int64), np.array([[i]], np.int64), idx)[0]
        return rows


class TorchScorer:
    """A checkpoint in PyTorch fp32 (:class:`glm_export.model.GLM4`, the model every export is checked against)."""

    def __init__(self, checkpoint: Path, threads: int | None = None) -> None:
        from glm_export.checkpoint import Checkpoint, load_model

        if threads:
            torch.set_num_threads(threads)
        ckpt = Checkpoint(checkpoint)
        self.cfg = ckpt.config
        self.model = load_model(ckpt, torch.float32)
        self.name = f"{checkpoint} (PyTorch fp32)"
        self.vocab_size = self.cfg.vocab_size

    def logits(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        ar = torch.arange(n).view(1, n)
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), ar, ar, *self.model.new_cache(1, n))[0][0]
        return out.float().numpy()


def open_scorer(path: Path, backend: str = "auto", threads: int | None = None) -> Scorer:
    """A checkpoint directory -> PyTorch; an artifact -> ONNX Runtime, or its TensorRT engine (``tensorrt``,
    or ``auto`` when the artifact has one and an NVIDIA GPU is present)."""
    path = Path(path)
    if is_artifact(path):
        if backend in ("auto", "tensorrt"):
            from glm_runtime.api import _tensorrt_engine
            from glm_runtime.manifest import model_config, read_manifest

            manifest = read_manifest(path, verify="size")
            engine = _tensorrt_engine(path, manifest, model_config(manifest))
            if engine is not None:
                return EngineScorer(path, engine)
            if backend == "tensorrt":
                raise EvalError(f"{path}: no TensorRT engine usable here (the artifact has none, or there is no "
                                "NVIDIA GPU); use --backend onnxruntime")
        return OrtScorer(path, threads)
    if is_checkpoint(path):
        if backend == "tensorrt":
            raise EvalError(f"{path} is a checkpoint: it runs in PyTorch, not TensorRT")
        return TorchScorer(path, threads)
    raise EvalError(f"{path} is neither an artifact (no manifest.json) nor a checkpoint (config.json + "
                    "*.safetensors): pass a directory made by glm-export build/export, or a GLM-4 checkpoint")


def load_tokenizer(path: Path) -> Any:
    """The GLMTokenizer of an artifact (tokenizer.json) or a checkpoint (tokenizer.json, or tokenizer.model
    converted in memory)."""
    from glm_runtime.tokenizer import GLMTokenizer, convert_tiktoken_file

    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path} is not a directory: pass an artifact made by glm-export build/export, or a GLM-4 "
                        "checkpoint directory")
    if (path / "tokenizer.json").is_file():
        return GLMTokenizer.from_dir(path)
    if (path / "tokenizer.model").is_file():
        import json

        cfg_path = path / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        return GLMTokenizer(convert_tiktoken_file(path / "tokenizer.model"), config)
    raise EvalError(f"{path} has no tokenizer (tokenizer.json / tokenizer.model): eval reads raw text, so the "
                    "model needs its tokenizer; rebuild the artifact from a checkpoint that has one")


def windows(ids: list[int], ctx: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of ``ctx`` tokens; the shorter tail is dropped (as llama-perplexity does)."""
    out = [ids[k:k + ctx] for k in range(0, len(ids) - ctx + 1, ctx)]
    return out[:limit] if limit else out


def first_scored(ctx: int, score: str) -> int:
    """Index of the first logit row that is scored (it predicts the token after it)."""
    if score not in SCORE_CHOICES:
        raise EvalError(f"score must be one of {SCORE_CHOICES}, got {score!r}")
    return ctx // 2 if score == "second-half" else 0


def log_softmax64(x: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(np.asarray(x, dtype=np.float64)), -1).numpy()


@dataclass
class Tally:
    """Per-position sums, turned into the reported numbers by :meth:`result`."""

    nll: list[float] = field(default_factory=list)
    nll_ref: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    same_top1: list[float] = field(default_factory=list)

    def add(self, lp: np.ndarray, targets: np.ndarray, ref: np.ndarray | None) -> None:
        rows = np.arange(len(targets))
        self.nll += list(-lp[rows, targets])
        if ref is not None:
            self.nll_ref += list(-ref[rows, targets])
            self.kl += list((np.exp(ref) * (ref - lp)).sum(-1))
            self.same_top1 += list((ref.argmax(-1) == lp.argmax(-1)).astype(float))


def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


@dataclass
class EvalResult:
    model: str
    text: str
    ctx: int
    score: str
    windows: int
    tokens_scored: int
    ppl: float
    ppl_se: float  # standard error of the perplexity (from the per-token NLL's standard error)
    reference: str | None = None
    ppl_reference: float | None = None
    delta_ppl_pct: float | None = None  # 100 x (ppl / ppl_reference - 1)
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_se: float | None = None  # paired: per-token NLL differences
    mean_kl: float | None = None
    mean_kl_se: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(t: Tally, **meta: Any) -> EvalResult:
    mean, se = _mean_se(t.nll)
    res = EvalResult(tokens_scored=len(t.nll), ppl=math.exp(mean), ppl_se=math.exp(mean) * se, **meta)
    if t.nll_ref:
        ref_mean, _ = _mean_se(t.nll_ref)
        diff_mean, diff_se = _mean_se([a - b for a, b in zip(t.nll, t.nll_ref, strict=True)])
        res.ppl_reference = math.exp(ref_mean)
        res.delta_ppl_pct = 100.0 * math.expm1(mean - ref_mean)
        res.ln_ppl_ratio, res.ln_ppl_ratio_se = diff_mean, diff_se
        res.mean_kl, res.mean_kl_se = _mean_se(t.kl)
        res.top1_agreement = float(np.mean(t.same_top1))
    return res


def evaluate_ids(candidate: Scorer, ids: list[int], ctx: int = 256, reference: Scorer | None = None,
                 score: str = "all", max_windows: int | None = None, text_name: str = "",
                 progress: bool = True) -> EvalResult:
    """Perplexity (and, with ``reference``, KL / top-1 / Δ perplexity) over non-overlapping windows of ``ids``."""
    if ctx < 2:
        raise EvalError(f"--ctx must be at least 2 tokens, got {ctx}")
    wins = windows(ids, ctx, max_windows)
    if not wins:
        raise EvalError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}: give a longer "
                        "text or a smaller --ctx")
    if reference is not None and reference.vocab_size != candidate.vocab_size:
        raise EvalError(f"the reference has {reference.vocab_size} vocabulary rows, the model "
                        f"{candidate.vocab_size}: they are not the same model")
    first = first_scored(ctx, score)
    tally = Tally()
    bar = count_progress()
    bar.disable = not progress
    with bar:
        task = bar.add_task(f"eval: {len(wins)} windows of {ctx} tokens", total=len(wins))
        for win in wins:
            lp = log_softmax64(candidate.logits(win)[first:-1])
            ref = log_softmax64(reference.logits(win)[first:-1]) if reference is not None else None
            tally.add(lp, np.asarray(win[first + 1:]), ref)
            bar.advance(task)
    return summarize(tally, model=candidate.name, text=text_name, ctx=ctx, score=score, windows=len(wins),
                     reference=reference.name if reference is not None else None)


def tokenize_text(text_file: Path, tokenizer_from: Path) -> list[int]:
    path = Path(text_file)
    if not path.is_file():
        raise EvalError(f"text file {path} not found: pass --text PATH to a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it first") from None
    return load_tokenizer(tokenizer_from).encode(text)


def evaluate(model: Path, text_file: Path, ctx: int = 256, reference: Path | None = None, score: str = "all",
             max_windows: int | None = None, backend: str = "auto", threads: int | None = None,
             progress: bool = True) -> EvalResult:
    """``glm-export eval``: open ``model`` (and ``reference``), tokenize ``text_file`` with the model's tokenizer,
    and evaluate."""
    first_scored(ctx, score)
    ids = tokenize_text(text_file, model)
    cand = open_scorer(model, backend, threads)
    ref = open_scorer(reference, "auto", threads) if reference is not None else None
    return evaluate_ids(cand, ids, ctx, ref, score, max_windows, str(text_file), progress)


def markdown(res: EvalResult) -> list[str]:
    scored = "every token after a window's first" if res.score == "all" else "the second half of each window"
    lines = [f"Held-out perplexity on `{res.text}`: {res.windows} non-overlapping windows of {res.ctx} tokens, "
             f"{scored} scored ({res.tokens_scored} tokens).", ""]
    if res.reference is None:
        return [*lines, "| perplexity |", "|---|", f"| {res.ppl:.4f} ± {res.ppl_se:.3f} |", ""]
    return [*lines,
        f"Reference: {res.reference}.", "",
        "| perplexity | reference | Δ perplexity | mean KL | top-1 agreement |",
        "|---|---|---|---|---|",
        f"| {res.ppl:.4f} | {res.ppl_reference:.4f} | {res.delta_ppl_pct:+.3f} % (ln ratio {res.ln_ppl_ratio:.2e} "
        f"± {res.ln_ppl_ratio_se:.1e}) | {res.mean_kl:.3e} ± {res.mean_kl_se:.1e} | {res.top1_agreement:.4f} |", "",
    ]
