"""Layer-streamed quantization: checkpoint -> quantized ONNX graph without a float32 copy of the model.

The whole-model path (``export`` to a float32 graph, then ``quantize_into``) holds the float32 model in PyTorch
for calibration and every initializer in numpy while rewriting: 37.6 GB each for GLM-4-9B. Here:

1. the graph is traced from placeholders (as ``export`` does) with every weight a lazy loader from the
   memory-mapped safetensors;
2. calibration runs the checkpoint one decoder layer at a time (:func:`glm_export.calibrate.collect_streamed`);
3. as soon as a layer has run, its four MatMul weights are read (float32, 0.8 GB for a 9B layer), smoothed / folded,
   quantized, and every tensor the layer produced is appended to ``model.onnx.data`` and replaced in the graph by
   a reference to it (:class:`DataWriter`) before the next layer is read;
4. what is left (the embedding, in the checkpoint's 16-bit type, and the small tensors) is streamed out the same
   way, and ``model.onnx`` is written last, referencing the data file.

Peak memory is one layer in float32 plus its quantized copy, the calibration's hidden states and the graph's
structure; nothing is written twice. The result equals the whole-model path's, tensor for tensor
(tests/test_stream_quant.py). ``docs/memory.md`` has the numbers.

Resuming (``progress``, a :class:`glm_export.resume.Partial` that ``build`` keeps in the staging directory): each
quantized layer leaves the byte range it appended to ``model.onnx.data`` (sha256 in the journal) and the log of
its graph edits (:attr:`Rewriter.log`), which a resumed run replays with tensors pointing into the data file
instead of quantizing the layer again; then the layer counts as calibrated, leaving its statistics and the hidden
states after it in ``.partial/``. A resumed run replays the finished layers and calibrates on from the last one
whose hidden states it holds (from layer 0 if a damaged earlier layer must be redone: GPTQ's ``X^T X`` is never
stored, 750 MB per 9B module). The resumed artifact is byte-identical to an uninterrupted build's
(tests/test_stream_resume.py).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import onnx
import onnx_ir as ir
import torch

from glm_export import accuracy, calibrate
from glm_export.calibrate import CalibrationError
from glm_export.checkpoint import Checkpoint
from glm_export.export import (
    ONNX_DATA,
    ONNX_FILE,
    _copy_side_files,
    _stream_weights,
    _to_ir_tensor,
    build_manifest,
    trace,
)
from glm_export.progress import console
from glm_export.quantize import kv as quant_kv
from glm_export.quantize.rewrite import (
    QuantizeError,
    QuantOptions,
    Rewriter,
    Weights,
    _tokenizer_dir,
    check_options,
    describe,
    embed_16bit,
    embedding_dtype,
    head_16bit,
    hessian_modules,
    kv_ranges,
    markdown,
    quantize_names,
    resolve_host_options,
    resolve_lm_head,
    resolve_weight_block,
    targets,
)
from glm_export.resume import PARTIAL, Partial

INLINE_BYTES = 1024  # smaller initializers stay in model.onnx (scales, zero points, norms of a tiny model)
ALIGN = 4096  # large tensors start on a page boundary, so ONNX Runtime can map them


#: Called after each finished unit ("calib.N", "calib", "quant.GROUP") is journaled: tests raise from it to kill
#: a build there.
after_unit: Callable[[str], None] | None = None


class DataWriter:
    """Appends tensors to the external-data file and points the graph's initializers at them; ``resume_at``: keep
    the file's first bytes (finished layers) and append after them. ``digest`` hashes what was written since
    :meth:`begin` (a layer's byte range, for the resume journal)."""

    def __init__(self, artifact: Path, resume_at: int = 0) -> None:
        self.dir = Path(artifact)
        self.path = self.dir / ONNX_DATA
        if resume_at:
            self.file: BinaryIO = open(self.path, "r+b")  # closed by close()
            self.file.truncate(resume_at)
            self.file.seek(resume_at)
        else:
            self.file = open(self.path, "wb")
        self.offset = resume_at
        self.bytes = 0
        self.hash = hashlib.sha256()

    def begin(self) -> int:
        self.hash = hashlib.sha256()
        return self.offset

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, value: ir.Value) -> None:
        tensor = value.const_value
        assert tensor is not None
        data = tensor.tobytes()  # a lazy tensor reads (and converts) its checkpoint tensor here
        if len(data) > ALIGN:
            pad = -self.offset % ALIGN
            self.file.write(b"\0" * pad)
            self.hash.update(b"\0" * pad)
            self.offset += pad
        self.file.write(data)
        self.hash.update(data)
        value.const_value = ir.ExternalTensor(ONNX_DATA, self.offset, len(data), tensor.dtype, shape=tensor.shape,
                                              name=value.name, base_dir=self.dir)
        self.offset += len(data)
        self.bytes += len(data)

    def flush_graph(self, graph: ir.Graph, lazy: bool = False) -> None:
        """Write every in-memory initializer above :data:`INLINE_BYTES` (and, with ``lazy``, every checkpoint
        tensor not read yet); afterwards the graph holds no large array."""
        for value in list(graph.initializers.values()):
            t = value.const_value
            if t is None or isinstance(t, ir.ExternalTensor) or t.nbytes <= INLINE_BYTES:
                continue
            if isinstance(t, ir.LazyTensor) and not lazy:
                continue
            self.write(value)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if parts[0] == "layers" else "head"


def _finished(unit: str) -> None:
    if after_unit is not None:
        after_unit(unit)


class CheckpointColumns:
    """Output columns of a ``[in, out]`` MatMul weight, read from the checkpoint's ``[out, in]`` rows (memory-mapped,
    16-bit for GLM-4-9B) and widened to float32 one selection at a time: :meth:`Weights.columns` for the output
    layer, whose float32 copy alone would be 2.5 GB."""

    def __init__(self, ckpt: Checkpoint, name: str) -> None:
        self.ckpt, self.name = ckpt, name
        self.t: torch.Tensor | None = None

    def __call__(self, cols: slice | Any) -> Any:
        if self.t is None:
            self.t = self.ckpt.tensor(self.name)  # mapped (and checked) once, not per chunk
        rows = self.t[cols] if isinstance(cols, slice) else self.t[torch.from_numpy(cols)]
        return rows.t().to(torch.float32).contiguous().numpy()

    def close(self) -> None:
        self.t = None


class CalibrationStore:
    """:class:`calibrate.LayerStore` in the partial journal: ``.partial/calib-N.pt`` (layer N's statistics, kept)
    and ``.partial/hidden-N.pt`` (the hidden states after it, only for the last finished layer)."""

    def __init__(self, progress: Partial, layers: int) -> None:
        self.p, self.layers = progress, layers

    def _rel(self, kind: str, i: int) -> str:
        return f"{PARTIAL}/{kind}-{i}.pt"

    def load(self) -> tuple[int, list[torch.Tensor] | None, list[dict[str, Any]]]:
        n = 0
        while n < self.layers and self.p.valid(f"calib.{n}"):
            n += 1
        self.p.truncate([f"calib.{i}" for i in range(n, self.layers)])
        last = self.p.units.get(f"calib.{n - 1}", {}) if n else {}
        if not n or not any(f["path"] == self._rel("hidden", n - 1) for f in last.get("files", [])):
            self.p.truncate([f"calib.{i}" for i in range(self.layers)])
            return 0, None, []
        console.print(f"resuming calibration after layer {n - 1} (layers 0-{n - 1} are in {self.p.dir})")
        states = [torch.load(self.p.root / self._rel("calib", i), weights_only=True) for i in range(n)]
        for st in states:
            st["stats"] = {k: calibrate.ModuleStats(**v) for k, v in st["stats"].items()}
        hidden = torch.load(self.p.root / self._rel("hidden", n - 1), weights_only=True)
        return n, hidden, states

    def save(self, layer: int, hidden: list[torch.Tensor], state: dict[str, Any]) -> None:
        state = {"stats": {k: _module_dict(v) for k, v in state["stats"].items()}, "kv": state["kv"],
                 "kv_ch": state["kv_ch"]}
        for kind, obj in (("calib", state), ("hidden", hidden)):
            tmp = self.p.root / (self._rel(kind, layer) + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            torch.save(obj, tmp)
            os.replace(tmp, self.p.root / self._rel(kind, layer))
        self.p.record(f"calib.{layer}", [{"path": self._rel("calib", layer)}, {"path": self._rel("hidden", layer)}])
        if layer:  # only the last layer's hidden states are needed to go on
            prev = self.p.units[f"calib.{layer - 1}"]
            prev["files"] = [f for f in prev["files"] if f["path"] != self._rel("hidden", layer - 1)]
            self.p.record(f"calib.{layer - 1}", prev["files"])
            (self.p.root / self._rel("hidden", layer - 1)).unlink(missing_ok=True)
        _finished(f"calib.{layer}")


def _calibrate(ckpt: Checkpoint, seqs: list[list[int]], note: str, progress: Partial | None,
               hessian: list[str], layer_done: Callable[[int, dict[str, calibrate.ModuleStats]], None],
               quantized_layers: int, all_quantized: bool) -> calibrate.Stats:
    """``collect_streamed``, resumable and quantizing each layer as it finishes (``layer_done``): the finished
    statistics are one unit ("calib"), the layers before it one each (their files are dropped once the whole is
    stored). ``quantized_layers``: how many decoder layers' quantized groups are journaled (a calibrated layer
    past them cannot be trusted: its group was damaged or lost); ``all_quantized``: every group is."""
    layers = ckpt.config.num_layers
    rel = f"{PARTIAL}/stats.pt"
    if progress is not None:
        if all_quantized and progress.valid("calib"):
            console.print(f"resuming: calibration finished earlier ({progress.dir})")
            return _stats_from(torch.load(progress.root / rel, weights_only=True))
        progress.truncate(["calib", *(f"calib.{i}" for i in range(quantized_layers, layers))])
    store = CalibrationStore(progress, layers) if progress is not None else None
    stats = calibrate.collect_streamed(ckpt, seqs, note, hessian=hessian, layer_done=layer_done, store=store)
    if progress is not None:
        tmp = progress.root / (rel + ".tmp")
        torch.save(_stats_to(stats), tmp)
        os.replace(tmp, progress.root / rel)
        progress.record("calib", [{"path": rel}])
        progress.truncate([f"calib.{i}" for i in range(layers)])
        for f in progress.dir.glob("calib-*.pt"):
            f.unlink()
        for f in progress.dir.glob("hidden-*.pt"):
            f.unlink()
        _finished("calib")
    return stats


def _module_dict(m: calibrate.ModuleStats) -> dict[str, Any]:
    """The fields as they are (``asdict`` would deep-copy every kept row: 2 GB for GLM-4-9B)."""
    return {"absmax": m.absmax, "abssum": m.abssum, "count": m.count, "rows": m.rows}


def _stats_to(stats: calibrate.Stats) -> dict[str, Any]:
    return {"modules": {k: _module_dict(v) for k, v in stats.modules.items()}, "kv_absmax": stats.kv_absmax,
            "tokens": stats.tokens, "note": stats.note, "kv_channel_absmax": stats.kv_channel_absmax}


def _stats_from(d: dict[str, Any]) -> calibrate.Stats:
    return calibrate.Stats({k: calibrate.ModuleStats(**v) for k, v in d["modules"].items()}, d["kv_absmax"],
                           d["tokens"], d["note"], d["kv_channel_absmax"])


def _tensor_record(value: ir.Value) -> dict[str, Any]:
    """How to find an initializer again: its place in the data file, or (small, inline) its serialized bytes."""
    t = value.const_value
    if isinstance(t, ir.ExternalTensor):
        return {"offset": t.offset, "length": t.length, "dtype": int(t.dtype), "shape": list(t.shape.numpy())}
    proto = ir.serde.serialize_tensor(t)
    return {"proto": base64.b64encode(proto.SerializeToString()).decode()}


def _tensor_from(name: str, rec: dict[str, Any], artifact: Path) -> ir.TensorProtocol:
    if "proto" in rec:
        return ir.serde.deserialize_tensor(onnx.TensorProto.FromString(base64.b64decode(rec["proto"])))
    return ir.ExternalTensor(ONNX_DATA, rec["offset"], rec["length"], ir.DataType(rec["dtype"]),
                             shape=ir.Shape(rec["shape"]), name=name, base_dir=artifact)


def _array_record(a: Any) -> dict[str, Any]:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def _array_from(rec: dict[str, Any]) -> Any:
    import numpy as np

    return np.frombuffer(base64.b64decode(rec["data"]), dtype=rec["dtype"]).reshape(rec["shape"]).copy()


def quantize_streamed(model_dir: Path, artifact: Path, precision: str, options: QuantOptions,
                      progress: Partial | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write a quantized artifact's graph and side files into ``artifact`` (a staging directory); return
    (manifest, the report's quantization section). The graph's float type follows ``options.backend`` as the
    whole-model path's export does: float32 for ONNX Runtime (CPU), float16 for TensorRT (no fp32 attention there;
    its Q/DQ nodes carry the precision). ``progress``: the step's partial journal (resume after the last
    finished layer of calibration or quantization; see the module's docstring)."""
    options = resolve_host_options(options)
    check_options(precision, options)
    t0 = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    ckpt.validate()
    cfg = ckpt.config
    options = resolve_weight_block(resolve_lm_head(options, cfg, precision), cfg, precision)
    extra = _copy_side_files(model_dir, artifact)  # first: tokenizer.json may be converted from tokenizer.model
    tok_dir = _tokenizer_dir(Path(model_dir), Path(artifact))
    try:
        records = calibrate.load_records(options.calibration)
        seqs, note = calibrate.tokenize(records, tok_dir, cfg.vocab_size, options.calib_samples, options.calib_seq_len)
    except CalibrationError as e:
        raise QuantizeError(f"calibration set {options.calibration}: {e}") from None
    if "random token ids" in note:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"tracing GLM-4 ({cfg.num_layers} layers); calibrating and quantizing it to {precision}, "
                  f"layer by layer")
    t_tr = time.perf_counter()
    dtype = torch.float32 if options.backend == "onnxruntime" else torch.float16
    model = trace(ckpt, dtype)
    t_trace = time.perf_counter() - t_tr
    _stream_weights(model, ckpt, dtype)
    weights, rewriter = Weights(model.graph, cfg), Rewriter(model)
    head = CheckpointColumns(ckpt, "embed.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    weights.sources["lm_head.weight"] = head  # read in chunks of rows, never converted whole to float32
    names = [n for n in targets(cfg, options) if n in rewriter.users]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(layer_of(n), []).append(n)
    layers: dict[str, Any] = {}
    units = {g: f"quant.{g}" for g in groups}
    order = list(units.values())
    done = 0
    while progress is not None and done < len(order) and progress.valid(order[done]):
        done += 1
    finished = set(order[:done])
    resume_at = 0
    if progress is not None:
        progress.truncate(order[done:])
        if done:
            resume_at = progress.units[order[done - 1]]["files"][0]["end"]
            console.print(f"resuming: {done} of {len(order)} layer groups are quantized already (in {ONNX_DATA})")
    # decoder layers 0..k-1 all quantized: calibration may resume after any of them
    quantized_layers = 0
    while quantized_layers < cfg.num_layers and units.get(str(quantized_layers), "") in finished:
        quantized_layers += 1
    writer = DataWriter(artifact, resume_at)
    t_quant = 0.0

    def layer_done(i: int, modules: dict[str, calibrate.ModuleStats]) -> None:
        """Quantize decoder layer ``i`` (or the output layer: ``i = num_layers``) as soon as its statistics are
        complete: a layer's folds edit only its own tensors, so this computes what one pass over all names after
        calibration does, while at most one layer's GPTQ second moments (``X^T X``) exist."""
        nonlocal t_quant
        g = "head" if i == cfg.num_layers else str(i)
        if g not in groups or units[g] in finished:  # finished groups were replayed up front
            return
        t = time.perf_counter()
        rewriter.log = []
        start = writer.begin()
        section = quantize_names(groups[g], weights, rewriter, precision, options,
                                 calibrate.Stats(modules, {}, 0, note), consume=True)
        layers.update(section)
        writer.flush_graph(model.graph)
        head.close()
        ckpt.release()
        gc.collect()
        if progress is not None:
            writer.sync()
            record = _group_record(section, rewriter, weights, model.graph, groups[g])
            progress.record(units[g], [{"path": ONNX_DATA, "start": start, "end": writer.offset,
                                        "sha256": writer.hash.hexdigest()}], record)
            finished.add(units[g])
            _finished(units[g])
        rewriter.log = None
        t_quant += time.perf_counter() - t

    try:
        for unit in order[:done]:  # finished earlier: redo their graph edits with the stored tensors
            assert progress is not None
            _replay(progress.result(unit), rewriter, weights, layers, Path(artifact))
        stats = _calibrate(ckpt, seqs, note, progress, hessian_modules(cfg, precision, options), layer_done,
                           quantized_layers, done == len(order))
        t1 = time.perf_counter()
        # 16-bit straight from the checkpoint: never a float32 copy of the 151552 x 4096 table
        embed_16bit(model, embedding_dtype(ckpt),
                    lambda: _to_ir_tensor(ckpt.tensor("embed.weight").contiguous(), "embed.weight"))
        if options.lm_head == "float":  # unquantized, but 16-bit as in the checkpoint: never float32 (issue 13)
            source = "embed.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            head_16bit(model, embedding_dtype(ckpt, source),
                       lambda: _to_ir_tensor(ckpt.tensor(source).t().contiguous(), "lm_head.weight"))
        if options.kv_cache != "model":
            layers["kv_cache"] = quant_kv.quantize_cache(model, kv_ranges(stats, weights.v_scales))
        writer.flush_graph(model.graph, lazy=True)  # the embedding and whatever else was not quantized
        ckpt.release()
    finally:
        writer.close()
    if progress is not None:
        progress.truncate(units)  # the data file is whole: the step's inventory covers it from here
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    tmp = Path(artifact) / (ONNX_FILE + ".tmp")
    ir.save(model, tmp)  # every large tensor is already external: this writes the graph only
    # the graph now holds only references to the data file (its arrays were flushed), so it may stay alive
    os.replace(tmp, Path(artifact) / ONNX_FILE)
    onnx.checker.check_model(str(Path(artifact) / ONNX_FILE), full_check=False)
    manifest = build_manifest(artifact, cfg, str(dtype).removeprefix("torch."), ckpt, extra_info=extra)
    t2 = time.perf_counter()
    manifest["timings"] = {"trace_s": round(t_trace, 2), "export_s": round(t2 - t1 + t_quant, 2)}
    kv = layers.pop("kv_cache", None)
    report: dict[str, Any] = {
        "precision": precision, "options": asdict(options), "calibration": stats.to_report(),
        "scheme": describe(precision, options), "layers": layers, "weight_bytes": weight_bytes,
        **({"kv_cache": kv} if kv else {}), "streamed": True,
        "timings": {"calibrate_s": round(t1 - t0 - t_quant - t_trace, 2), "rewrite_s": round(t2 - t1 + t_quant, 2)},
    }
    if options.accuracy_samples > 0:
        try:
            report["accuracy"] = accuracy.measure(Path(model_dir), Path(artifact), tok_dir,
                                                  samples=options.accuracy_samples, streamed=True)
        except Exception as e:  # report it, keep the artifact (as quantize_into does)
            report["accuracy"] = {"status": "skipped", "reason": f"ONNX Runtime CPU could not run the graph: {e}"}
        report["timings"]["accuracy_s"] = round(time.perf_counter() - t2, 2)
    elif options.accuracy_skipped:
        report["accuracy"] = {"status": "skipped", "reason": options.accuracy_skipped}
    report["markdown"] = markdown(report)
    return manifest, report


def _group_record(section: dict[str, Any], rw: Rewriter, w: Weights, graph: ir.Graph, group: list[str]
                  ) -> dict[str, Any]:
    """What replaying a quantized layer group needs: its report section, its logged graph edits, where each
    tensor those edits created now lives, and the V scales its o_proj folded (the int8 KV cache needs them)."""
    assert rw.log is not None
    names = [t for entry in rw.log for t in entry["tensors"]]
    layers = {int(n.split(".")[1]) for n in group if n.startswith("layers.")}
    return {"layers": section, "log": rw.log, "tensors": {n: _tensor_record(graph.initializers[n]) for n in names},
            "v_scales": {str(i): _array_record(w.v_scales[i]) for i in sorted(layers) if i in w.v_scales}}


def _replay(record: dict[str, Any], rw: Rewriter, w: Weights, layers: dict[str, Any], artifact: Path) -> None:
    tensors = {n: _tensor_from(n, r, artifact) for n, r in record["tensors"].items()}
    for entry in record["log"]:
        rw.replay(entry, tensors)
    layers.update(record["layers"])
    for i, a in record["v_scales"].items():
        w.v_scales[int(i)] = _array_from(a)
