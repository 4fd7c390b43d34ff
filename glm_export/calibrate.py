"""Calibration: read a calibration set, turn it into token ids, and collect activation statistics.

Statistics come from the PyTorch model (the numerical reference), not from the ONNX graph: forward hooks on
every :class:`~glm_export.model.Linear` see exactly the tensor each quantized ``MatMul`` of the graph gets
(the graph's MatMul initializers *are* these modules' weights, ``docs/graph.md``). Per module we keep the
per-input-channel abs-max (SmoothQuant, static activation scales), the per-channel mean |x| (AWQ) and a
fixed-size random sample of input rows (AWQ's scale search and the SmoothQuant error check), and, when asked
(GPTQ), the input's second-moment matrix ``H = X^T X`` over every calibration row; per layer the abs-max of K
(after RoPE) and V as written into the cache. ``H`` is ``in^2`` floats per module (750 MB for GLM-4-9B's
13696-wide down projection): :func:`collect` keeps every module's (fine up to a few layers of 9B shapes),
:func:`collect_streamed` hands each layer's to a callback and drops it before the next layer runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from glm_export.progress import console, count_progress

MIN_SAMPLES = 8  # fewer gives scales that one odd prompt decides
MIN_TOKENS = 8
ROWS_KEPT = 256  # input rows sampled per module for AWQ's search


class CalibrationError(ValueError):
    """Unusable calibration input; the message says how to fix it."""


def default_calibration_path() -> Path:
    """The shipped set: ``glm_export/calibration`` in a wheel (mapped from the top-level ``calibration/``),
    the top-level ``calibration/`` in a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "calibration" / "default.jsonl", here.parent / "calibration" / "default.jsonl"):
        if candidate.is_file():
            return candidate
    raise CalibrationError("the shipped calibration set (calibration/default.jsonl) is missing from this install; "
                           "pass --calibration PATH.jsonl or reinstall glm-export")


def heldout_path() -> Path:
    """Held-out text for the accuracy report (never used for calibration)."""
    return default_calibration_path().with_name("heldout.jsonl")


def resolve_path(spec: str) -> Path:
    return default_calibration_path() if spec == "default" else Path(spec)


def load_records(spec: str) -> list[dict[str, Any]]:
    """Records ``{"messages": [...], "tools"?: [...]}`` or ``{"text": ...}`` from JSONL, or paragraphs of a .txt.

    Raises :class:`CalibrationError` naming the file and line for anything else.
    """
    path = resolve_path(spec)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found: pass --calibration default or a .jsonl/.txt path")
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix == ".txt":
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        return [{"text": p} for p in paragraphs]
    if path.suffix not in (".jsonl", ".json"):
        raise CalibrationError(f"{path}: unknown calibration format {path.suffix!r}; use .jsonl (one JSON object "
                               f"per line: {{\"messages\": [...]}} or {{\"text\": \"...\"}}) or .txt (plain text)")
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{n}: not JSON ({e.msg}); each line must be one JSON object") from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            records.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list) and all(
                isinstance(m, dict) and "role" in m for m in rec["messages"]):
            records.append(rec)
        else:
            raise CalibrationError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}} "
                                   f"or {{\"text\": \"...\"}}, got {str(rec)[:80]!r}")
    return records


def check_calibration(spec: str, samples: int) -> None:
    """Cheap up-front check (format and size), so a bad file fails before the export, not after."""
    if samples < MIN_SAMPLES:
        raise CalibrationError(f"--calib-samples {samples} is too few: use at least {MIN_SAMPLES} (default 256)")
    records = load_records(spec)
    if len(records) < MIN_SAMPLES:
        raise CalibrationError(f"{resolve_path(spec)} has {len(records)} usable samples; at least {MIN_SAMPLES} are "
                               f"needed (the shipped set has 288: --calibration default)")


def tokenize(records: Sequence[dict[str, Any]], tokenizer_dir: Path | None, vocab_size: int, samples: int,
             seq_len: int, seed: int = 0) -> tuple[list[list[int]], str]:
    """Token id sequences (each at most ``seq_len``) and a note saying how they were made.

    Chat records go through the checkpoint's own chat template, as the deployed model will see them. Without
    a tokenizer there is no faithful way to turn text into ids, so random ids stand in, and the note says so.
    """
    from glm_runtime.tokenizer import GLMTokenizer, TokenizerFileError

    tok = None
    if tokenizer_dir is not None:
        try:
            tok = GLMTokenizer.from_dir(tokenizer_dir)
        except TokenizerFileError:
            tok = None
    if tok is None:
        gen = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, vocab_size, (seq_len,), generator=gen).tolist() for _ in range(samples)]
        return ids, (f"the checkpoint has no tokenizer: calibrated on {samples} sequences of random token ids "
                     f"(statistics of real text need tokenizer.json / tokenizer.model beside the weights)")
    out: list[list[int]] = []
    templated = tok.chat_template is not None
    for rec in records[:samples]:
        if "messages" in rec and templated:
            ids = tok.apply_chat_template(rec["messages"], tools=rec.get("tools"), add_generation_prompt=False)
        else:
            text = rec.get("text") or "\n".join(str(m.get("content") or "") for m in rec["messages"])
            ids = tok.encode(text)
        ids = [i for i in ids if i < vocab_size][:seq_len]  # type: ignore[union-attr]
        if len(ids) >= MIN_TOKENS:
            out.append(ids)
    if len(out) < MIN_SAMPLES:
        raise CalibrationError(f"only {len(out)} calibration samples have {MIN_TOKENS}+ tokens; at least "
                               f"{MIN_SAMPLES} are needed: use longer samples (whole conversations or paragraphs) "
                               f"or --calibration default")
    how = "the checkpoint's chat template" if templated else "plain text (the tokenizer has no chat template)"
    return out, f"{len(out)} samples rendered through {how}, truncated to {seq_len} tokens"


@dataclass
class ModuleStats:
    """What one ``Linear`` input looked like over the calibration set (fp32, per input channel)."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    xtx: torch.Tensor | None = None  # sum over rows of x x^T [in, in] (GPTQ's H), when collected

    def hessian(self) -> torch.Tensor:
        """E[x x^T] over the calibration rows (GPTQ's H up to a factor, which it does not depend on)."""
        if self.xtx is None:
            raise CalibrationError("the calibration statistics have no input second moments (H): recalibrate "
                                   "with hessian=True (GPTQ needs them)")
        return self.xtx / max(self.count, 1)

    def take_hessian(self) -> torch.Tensor:
        """:meth:`hessian` in the sums' own buffer, which these statistics give up: quantization reads it once,
        and on GLM-4-9B's down projection a second copy is 750 MB."""
        h = self.hessian() if self.xtx is None else self.xtx.div_(max(self.count, 1))
        self.xtx = None
        return h

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.count, 1)

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.rows)[-ROWS_KEPT:] if self.rows else torch.zeros(0, self.absmax.numel())


@dataclass
class Stats:
    modules: dict[str, ModuleStats]  # keyed by weight name, e.g. "layers.0.qkv.weight"
    kv_absmax: dict[str, float]  # "past_key_0" -> abs-max of K after RoPE written into the cache
    tokens: int
    note: str
    # per channel ([kv_heads * head_dim]) abs-max of the same: a quantized cache needs V's range *after* the
    # o_proj smoothing / AWQ scales are folded into V's channels, which only per-channel maxima give
    kv_channel_absmax: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "note": self.note,
                "activation_absmax": {k: round(float(v.absmax.max()), 4) for k, v in self.modules.items()},
                "activation_outlier_ratio": {k: round(float(v.absmax.max() / v.absmax.median().clamp_min(1e-12)), 2)
                                             for k, v in self.modules.items()},
                "kv_absmax": {k: round(v, 4) for k, v in self.kv_absmax.items()}}


def logit_rows(n: int, vocab_size: int) -> int:
    return min(n, max(1, (1 << 24) // vocab_size))


def row_picks(lengths: Sequence[int], modules: Sequence[str], vocab_size: int, seed: int = 0
              ) -> dict[str, list[torch.Tensor]]:
    """Which input rows each module keeps from each sequence, drawn up front.

    The draws replay the order a whole-model forward fires the hooks in (per sequence: every layer's qkv,
    o_proj, gate_up, down, then lm_head), so a layer-by-layer run keeps exactly the rows the whole-model run
    keeps (and both keep the rows this code kept before it streamed).
    """
    gen = torch.Generator().manual_seed(seed)
    per_seq = max(1, ROWS_KEPT // max(len(lengths), 1) + 1)
    picks: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for n in lengths:
        for m in modules:
            rows = logit_rows(n, vocab_size) if m == "lm_head.weight" else n
            picks[m].append(torch.randint(0, rows, (min(per_seq, rows),), generator=gen))
    return picks


def module_order(num_layers: int) -> list[str]:
    """The quantized modules in the order a forward pass reaches them."""
    return [f"layers.{i}.{m}.weight" for i in range(num_layers) for m in ("qkv", "o_proj", "gate_up", "down")] + [
        "lm_head.weight"]


class Recorder:
    """Accumulates :class:`ModuleStats` from hooked ``Linear`` inputs; ``seq`` says which sequence is running.
    ``hessian``: the modules whose ``X^T X`` is accumulated too (GPTQ)."""

    def __init__(self, picks: dict[str, list[torch.Tensor]], hessian: Collection[str] = ()) -> None:
        self.picks = picks
        self.hessian = set(hessian)
        self.stats: dict[str, ModuleStats] = {}
        self.seq = 0
        self.kv: dict[str, float] = {}
        self.kv_ch: dict[str, torch.Tensor] = {}

    def record(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs()
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = ModuleStats(torch.zeros(x.shape[1]), torch.zeros(x.shape[1], dtype=torch.float64))
        torch.maximum(s.absmax, a.amax(0), out=s.absmax)
        s.abssum += a.sum(0, dtype=torch.float64)
        s.count += x.shape[0]
        if name in self.hessian:
            if s.xtx is None:
                s.xtx = torch.zeros(x.shape[1], x.shape[1])
            s.xtx.addmm_(x.T, x)
        s.rows.append(x[self.picks[name][self.seq]].clone())
        if sum(r.shape[0] for r in s.rows) > 2 * ROWS_KEPT:
            s.rows = [torch.cat(s.rows)[-ROWS_KEPT:]]

    def hook(self, name: str) -> Any:
        def fn(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.record(name, args[0])
        return fn

    def cache(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for kind, t in (("key", k), ("value", v)):
            name = f"past_{kind}_{layer}"
            self.kv[name] = max(self.kv.get(name, 0.0), float(t.abs().max()))
            ch = t.abs().amax(dim=(0, 2)).reshape(-1).float()
            self.kv_ch[name] = torch.maximum(self.kv_ch[name], ch) if name in self.kv_ch else ch

    def layer_state(self, layer: int) -> dict[str, Any]:
        """What decoder layer ``layer`` contributed (final once the layer has seen every sequence)."""
        prefix = f"layers.{layer}."
        kv = (f"past_key_{layer}", f"past_value_{layer}")
        return {"stats": {n: s for n, s in self.stats.items() if n.startswith(prefix)},
                "kv": {n: self.kv[n] for n in kv if n in self.kv},
                "kv_ch": {n: self.kv_ch[n] for n in kv if n in self.kv_ch}}

    def restore(self, state: dict[str, Any]) -> None:
        self.stats.update(state["stats"])
        self.kv.update(state["kv"])
        self.kv_ch.update(state["kv_ch"])

    def finish(self, tokens: int, note: str) -> Stats:
        for s in self.stats.values():
            s.rows = [s.sample_rows()]
        kv = {f"past_{kind}_{i}": self.kv[f"past_{kind}_{i}"]
              for i in range(len(self.kv) // 2) for kind in ("key", "value")}  # the whole model's order
        return Stats(self.stats, kv, tokens, note, self.kv_ch)


def collect(model: torch.nn.Module, sequences: Sequence[Sequence[int]], note: str = "", seed: int = 0,
            hessian: Collection[str] = ()) -> Stats:
    """Run every sequence through the model once (prefill, batch 1) with hooks on every ``Linear`` input;
    ``hessian`` names the modules (weight names) whose ``X^T X`` to keep as well."""
    from glm_export.model import Linear

    cfg = model.cfg  # type: ignore[attr-defined]
    rec = Recorder(row_picks([len(s) for s in sequences], module_order(cfg.num_layers), cfg.vocab_size, seed),
                   hessian)
    handles = [m.register_forward_pre_hook(rec.hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, Linear)]
    tokens = 0
    try:
        with torch.no_grad(), count_progress() as progress:
            task = progress.add_task("calibrating", total=len(sequences))
            for s, seq in enumerate(sequences):
                rec.seq = s
                ids = torch.tensor([list(seq)], dtype=torch.int64)
                n = ids.shape[1]
                pos = torch.arange(n).view(1, n)
                cache = model.new_cache(1, n)  # type: ignore[operator]
                # lm_head sees the last positions' rows (at most ~64 MB of logits): enough rows for a range.
                k = logit_rows(n, cfg.vocab_size)
                model(ids, pos, torch.arange(n - k, n).view(1, k), *cache)
                for i in range(cfg.num_layers):
                    rec.cache(i, cache[2 * i], cache[2 * i + 1])
                tokens += n
                progress.advance(task)
    finally:
        for h in handles:
            h.remove()
    console.print(f"calibrated on {len(sequences)} sequences, {tokens} tokens")
    return rec.finish(tokens, note)


class LayerStore(Protocol):
    """Where a streamed calibration keeps each finished layer (:mod:`glm_export.quantize.stream`), to resume."""

    def load(self) -> tuple[int, list[torch.Tensor] | None, list[dict[str, Any]]]:
        """(first layer to run, the hidden states entering it or None, the finished layers' recorder states)."""
        ...

    def save(self, layer: int, hidden: list[torch.Tensor], state: dict[str, Any]) -> None: ...


def collect_streamed(ckpt: Any, sequences: Sequence[Sequence[int]], note: str = "", seed: int = 0,
                     hessian: Collection[str] = (),
                     layer_done: Callable[[int, dict[str, ModuleStats]], None] | None = None,
                     store: LayerStore | None = None) -> Stats:
    """:func:`collect`, one decoder layer in memory at a time (:mod:`glm_export.layerwise`): the same numbers.

    The output layer is never loaded: calibration needs only its input (the final norm of the last positions).
    ``layer_done(i, modules)`` gets decoder layer ``i``'s finished statistics as soon as the layer has run
    (``"head"`` for the output layer: ``i = num_layers``); afterwards their ``X^T X`` and kept input rows are
    dropped (only the quantization of that layer reads them), so at most one layer's second-moment matrices and
    rows exist at a time (GPTQ on GLM-4-9B: ~1 GB instead of 40 GB; rows 53 MB instead of 2.1 GB). Without
    ``layer_done`` the rows stay, as :func:`collect` keeps them.
    ``store``: each finished layer's statistics and the hidden states after it are saved there (after
    ``layer_done``), and a run starts after the last layer it holds (the same numbers: the row picks are drawn
    up front).
    """
    from glm_export import layerwise
    from glm_export.model import Linear

    cfg = ckpt.config
    rec = Recorder(row_picks([len(s) for s in sequences], module_order(cfg.num_layers), cfg.vocab_size, seed),
                   hessian)

    def done(i: int, prefix: str) -> None:
        mods = {k: v for k, v in rec.stats.items() if k.startswith(prefix)}
        for m in mods.values():
            m.rows = [m.sample_rows()]
        if layer_done is not None:
            layer_done(i, mods)
        for m in mods.values():
            m.xtx = None
            if layer_done is not None:
                m.rows = []

    start, hidden = 0, None
    if store is not None:
        start, hidden, states = store.load()
        for state in states:
            rec.restore(state)
    if hidden is None:
        start, hidden = 0, [layerwise.embed(ckpt, seq) for seq in sequences]

    def before(i: int, layer: torch.nn.Module) -> Any:
        handles = []
        for n, m in layer.named_modules():
            if isinstance(m, Linear):
                name = f"layers.{i}.{n}.weight"

                def fn(module: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                    rec.record(name, args[0])
                handles.append(m.register_forward_pre_hook(fn))

        def undo() -> None:
            for h in handles:
                h.remove()
        return undo

    def before_seq(s: int) -> None:
        rec.seq = s

    def after_layer(i: int, hidden: list[torch.Tensor]) -> None:
        done(i, f"layers.{i}.")  # quantized (and journaled) before the layer counts as calibrated
        if store is not None:
            store.save(i, hidden, rec.layer_state(i))

    with count_progress() as progress:
        task = progress.add_task("calibrating (layer by layer)", total=cfg.num_layers, completed=start)
        hidden = layerwise.run_layers(ckpt, hidden, before, lambda i, s, k, v: rec.cache(i, k, v), before_seq,
                                      progress=lambda: progress.advance(task), start=start, after_layer=after_layer)
    for s, x in enumerate(hidden):
        rec.seq = s
        k = logit_rows(x.shape[1], cfg.vocab_size)
        rec.record("lm_head.weight", layerwise.final_norm(ckpt, x[:, -k:]))
    done(cfg.num_layers, "lm_head.")
    tokens = sum(len(s) for s in sequences)
    console.print(f"calibrated on {len(sequences)} sequences, {tokens} tokens, layer by layer")
    return rec.finish(tokens, note)
