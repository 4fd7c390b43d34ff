"""Layer-streamed quantization: checkpoint -> quantized ONNX graph without a float32 copy of the model.

The whole-model path (``export`` to a float32 graph, then ``quantize_into``) holds the float32 model in PyTorch
for calibration and every initializer in numpy while rewriting: 37.6 GB each for GLM-4-9B. Here:

1. calibration runs the checkpoint one decoder layer at a time (:func:`glm_export.calibrate.collect_streamed`);
2. the graph is traced from placeholders (as ``export`` does) with every weight a lazy loader from the
   memory-mapped safetensors;
3. layer by layer, its four MatMul weights are read (float32, 0.8 GB for a 9B layer), smoothed / folded,
   quantized, and every tensor the layer produced is appended to ``model.onnx.data`` and replaced in the graph by
   a reference to it (:class:`DataWriter`) before the next layer is read;
4. what is left (the embedding, in the checkpoint's 16-bit type, and the small tensors) is streamed out the same
   way, and ``model.onnx`` is written last, referencing the data file.

Peak memory is one layer in float32 plus its quantized copy, the calibration's hidden states and the graph's
structure; nothing is written twice. The result equals the whole-model path's, tensor for tensor
(tests/test_stream_quant.py). ``docs/memory.md`` has the numbers.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import onnx
import onnx_ir as ir
import torch

from glm_export import accuracy, calibrate, quant_kv
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
from glm_export.progress import console, count_progress
from glm_export.quantize import (
    QuantizeError,
    QuantOptions,
    Rewriter,
    Weights,
    _tokenizer_dir,
    check_options,
    describe,
    embed_16bit,
    embedding_dtype,
    kv_ranges,
    markdown,
    quantize_names,
    resolve_host_options,
    targets,
)

INLINE_BYTES = 1024  # smaller initializers stay in model.onnx (scales, zero points, norms of a tiny model)
ALIGN = 4096  # large tensors start on a page boundary, so ONNX Runtime can map them


class DataWriter:
    """Appends tensors to the external-data file and points the graph's initializers at them."""

    def __init__(self, artifact: Path) -> None:
        self.dir = Path(artifact)
        self.path = self.dir / ONNX_DATA
        self.file: BinaryIO = open(self.path, "wb")  # closed by close()
        self.offset = 0
        self.bytes = 0

    def write(self, value: ir.Value) -> None:
        tensor = value.const_value
        assert tensor is not None
        data = tensor.tobytes()  # a lazy tensor reads (and converts) its checkpoint tensor here
        if len(data) > ALIGN:
            pad = -self.offset % ALIGN
            self.file.write(b"\0" * pad)
            self.offset += pad
        self.file.write(data)
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


def quantize_streamed(model_dir: Path, artifact: Path, precision: str, options: QuantOptions
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write a quantized ONNX Runtime artifact's graph and side files into ``artifact`` (a staging directory);
    return (manifest, the report's quantization section)."""
    options = resolve_host_options(options)
    check_options(precision, options)
    t0 = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    ckpt.validate()
    cfg = ckpt.config
    extra = _copy_side_files(model_dir, artifact)  # first: tokenizer.json may be converted from tokenizer.model
    tok_dir = _tokenizer_dir(Path(model_dir), Path(artifact))
    try:
        records = calibrate.load_records(options.calibration)
        seqs, note = calibrate.tokenize(records, tok_dir, cfg.vocab_size, options.calib_samples, options.calib_seq_len)
    except CalibrationError as e:
        raise QuantizeError(f"calibration set {options.calibration}: {e}") from None
    if "random token ids" in note:
        console.print(f"[yellow]note:[/] {note}")
    stats = calibrate.collect_streamed(ckpt, seqs, note)
    t1 = time.perf_counter()

    console.print(f"tracing GLM-4 ({cfg.num_layers} layers) and quantizing it to {precision}, layer by layer")
    model = trace(ckpt, torch.float32)
    t_trace = time.perf_counter() - t1
    _stream_weights(model, ckpt, torch.float32)
    weights, rewriter = Weights(model.graph, cfg), Rewriter(model)
    names = [n for n in targets(cfg, options) if n in rewriter.users]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(layer_of(n), []).append(n)
    layers: dict[str, Any] = {}
    writer = DataWriter(artifact)
    try:
        with count_progress() as progress:
            task = progress.add_task(f"quantizing to {precision}", total=len(groups))
            for group in groups.values():
                layers.update(quantize_names(group, weights, rewriter, precision, options, stats))
                writer.flush_graph(model.graph)
                ckpt.release()
                gc.collect()
                progress.advance(task)
        # 16-bit straight from the checkpoint: never a float32 copy of the 151552 x 4096 table
        embed_16bit(model, embedding_dtype(ckpt),
                    lambda: _to_ir_tensor(ckpt.tensor("embed.weight").contiguous(), "embed.weight"))
        if options.kv_cache != "model":
            layers["kv_cache"] = quant_kv.quantize_cache(model, kv_ranges(stats, weights.v_scales))
        writer.flush_graph(model.graph, lazy=True)  # the embedding and whatever else was not quantized
        ckpt.release()
    finally:
        writer.close()
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    tmp = Path(artifact) / (ONNX_FILE + ".tmp")
    ir.save(model, tmp)  # every large tensor is already external: this writes the graph only
    del model, weights, rewriter
    gc.collect()
    os.replace(tmp, Path(artifact) / ONNX_FILE)
    onnx.checker.check_model(str(Path(artifact) / ONNX_FILE), full_check=False)
    manifest = build_manifest(artifact, cfg, "float32", ckpt, extra_info=extra)
    t2 = time.perf_counter()
    manifest["timings"] = {"trace_s": round(t_trace, 2), "export_s": round(t2 - t1, 2)}
    kv = layers.pop("kv_cache", None)
    report: dict[str, Any] = {
        "precision": precision, "options": asdict(options), "calibration": stats.to_report(),
        "scheme": describe(precision, options), "layers": layers, "weight_bytes": weight_bytes,
        **({"kv_cache": kv} if kv else {}), "streamed": True,
        "timings": {"calibrate_s": round(t1 - t0, 2), "rewrite_s": round(t2 - t1, 2)},
    }
    if options.accuracy_samples > 0:
        try:
            report["accuracy"] = accuracy.measure(Path(model_dir), Path(artifact), tok_dir,
                                                  samples=options.accuracy_samples, streamed=True)
        except Exception as e:  # report it, keep the artifact (as quantize_into does)
            report["accuracy"] = {"status": "skipped", "reason": f"ONNX Runtime CPU could not run the graph: {e}"}
        report["timings"]["accuracy_s"] = round(time.perf_counter() - t2, 2)
    report["markdown"] = markdown(report)
    return manifest, report
