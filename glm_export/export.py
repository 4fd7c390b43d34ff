"""Checkpoint -> ONNX (opset 24) with an in-place KV cache, plus the artifact around it.

Memory is what limits exporting a 9B model on a 24 GB machine, so the graph is traced from a model whose
large weights are *uninitialised* placeholders (``torch.empty``: address space, no resident pages), and
the real weights are then streamed from the memory-mapped checkpoint into the ONNX external-data file one
tensor at a time (converted to the export dtype and transposed to the MatMul layout on the way). Peak
memory is therefore about one tensor plus the checkpoint pages the OS keeps cached, not the model twice.

Graph interface (also in ``docs/graph.md`` and the manifest's ``graph`` entry):

inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64, logits_index [batch, num_logits]
         int64, past_key_{i} / past_value_{i} [batch, kv_heads, cache_len, head_dim] (model dtype)
outputs  logits [batch, num_logits, vocab] float32, present_key_{i} / present_value_{i} (same shapes as
         the pasts: bind the same buffer as input and output and the cache is updated in place)
"""

from __future__ import annotations

import json
import logging
import platform
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ml_dtypes
import onnx
import onnx_ir as ir
import torch

import glm_export
from glm_export import atomic
from glm_export.checkpoint import Checkpoint
from glm_export.model import GLM4, is_matmul_weight, torch_dtype
from glm_export.progress import bytes_progress, console
from glm_export.weight_check import WeightError
from glm_runtime import manifest as mf
from glm_runtime.config import ModelConfig

log = logging.getLogger(__name__)

OPSET = 24
ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's limit: above it the weights go to model.onnx.data
SMALL_TENSOR_BYTES = 1 << 20  # tensors below this are loaded for real before tracing (see _placeholder_model)
COPIED_FILES = ("tokenizer_config.json", "generation_config.json", "tokenizer.model")


def io_names(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    cache = [f"{kv}_{i}" for i in range(cfg.num_layers) for kv in ("key", "value")]
    return (["input_ids", "position_ids", "logits_index"] + [f"past_{c}" for c in cache],
            ["logits"] + [f"present_{c}" for c in cache])


def _placeholder_model(ckpt: Checkpoint, dtype: torch.dtype) -> GLM4:
    """A traceable model: small tensors real, large ones uninitialised (their values never matter to tracing).

    The small ones are real because the exporter's constant folding may compute with them (e.g. the norm
    weights' cast to fp32); ``_stream_weights`` then insists every large initializer is a named parameter.
    """
    model = GLM4(ckpt.config, dtype=dtype, onnx_ops=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if p.numel() * p.element_size() < SMALL_TENSOR_BYTES:
                t = ckpt.tensor(name, dtype)
                p.copy_(t.t() if is_matmul_weight(name) else t)
    return model.eval()


def _sample_inputs(model: GLM4) -> tuple[torch.Tensor, ...]:
    # Sizes > 1 and distinct so torch.export specialises none of the dynamic dims.
    batch, seq, n_logits, cache_len = 2, 5, 3, 16
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    pos = torch.arange(seq).expand(batch, seq).contiguous()
    idx = torch.zeros(batch, n_logits, dtype=torch.int64)
    return (ids, pos, idx, *model.new_cache(batch, cache_len))


def trace(ckpt: Checkpoint, dtype: torch.dtype) -> ir.Model:
    model = _placeholder_model(ckpt, dtype)
    args = _sample_inputs(model)
    inputs, outputs = io_names(ckpt.config)
    seq = {0: "batch", 1: "seq"}
    cache = tuple({0: "batch", 2: "cache_len"} for _ in range(2 * ckpt.config.num_layers))
    dynamic_shapes = (seq, seq, {0: "batch", 1: "num_logits"}, cache)
    # The exporter warns about torchvision ops and torch-internal deprecations: noise for our users.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model, args, dynamo=True, opset_version=OPSET, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
    return program.model


def _to_ir_tensor(t: torch.Tensor, name: str) -> ir.Tensor:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        array = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = t.numpy()
    return ir.Tensor(array, name=name)


def _stream_weights(model: ir.Model, ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Point every parameter initializer at a lazy loader from the checkpoint; return total weight bytes."""
    canonical = set(ckpt.canonical_names())
    tied = ckpt.config.tie_word_embeddings
    total = 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        nbytes = tensor.nbytes if tensor is not None else 0
        source = "embed.weight" if (tied and name == "lm_head.weight") else name
        if source not in canonical:
            if nbytes >= SMALL_TENSOR_BYTES:
                raise RuntimeError(
                    f"the exporter produced a {nbytes}-byte initializer {name!r} that is not a checkpoint "
                    f"tensor (constant folding of a weight?); refusing to write a graph with wrong weights"
                )
            total += nbytes
            continue

        def load(src: str = source, dst: str = name) -> ir.Tensor:
            t = ckpt.tensor(src)  # transpose in the checkpoint dtype, then widen: one full-size copy fewer
            t = t.t().contiguous() if is_matmul_weight(dst) else t
            tensor = _to_ir_tensor(t.to(dtype), dst)
            ckpt.release()  # unmap the shard: its touched pages would otherwise stay resident
            return tensor

        value.const_value = ir.LazyTensor(load, dtype=tensor.dtype, shape=tensor.shape, name=name)
        total += nbytes
    return total


def export_onnx(
    model_dir: Path, out: Path, dtype: str = "float32", overwrite: bool = False, check: bool = True,
    max_weight_abs: float | None = None,
) -> dict[str, Any]:
    """Export ``model_dir`` to a new artifact directory ``out`` (atomically); return its manifest.

    Every weight is checked on its way through (non-finite values, and magnitudes over ``max_weight_abs``):
    :mod:`glm_export.weight_check`.
    """
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        manifest = export_into(model_dir, tmp, dtype, check=check, max_weight_abs=max_weight_abs)
        write_manifest(tmp, manifest)
    console.print(f"wrote {out} in {manifest['timings']['export_s']:.1f} s")
    return manifest


def export_into(model_dir: Path, tmp: Path, dtype: str = "float32", check: bool = True,
                max_weight_abs: float | None = None) -> dict[str, Any]:
    """Write the graph and side files into the (staging) directory ``tmp``; return the manifest to write."""
    t0 = time.perf_counter()
    ckpt = Checkpoint(model_dir, max_weight_abs=max_weight_abs)
    ckpt.validate()
    cfg = ckpt.config
    tdtype = torch_dtype(dtype)
    console.print(f"tracing GLM-4 ({cfg.num_layers} layers, {cfg.num_parameters() / 1e9:.2f} B parameters, "
                  f"{ckpt.layout} layout) as {dtype} ONNX opset {OPSET}")
    graph = trace(ckpt, tdtype)
    t_trace = time.perf_counter() - t0
    total = _stream_weights(graph, ckpt, tdtype)
    graph.producer_name, graph.producer_version = "glm-export", glm_export.__version__
    external = total > EXTERNAL_DATA_THRESHOLD
    with bytes_progress() as progress:
        task = progress.add_task("writing weights", total=total)

        def advance(tensor: ir.TensorProtocol, info: Any) -> None:
            progress.advance(task, tensor.nbytes)

        # One tensor in flight at a time: peak memory is one converted tensor, not a GB-sized window.
        try:
            ir.save(graph, tmp / ONNX_FILE, external_data=ONNX_DATA if external else None, callback=advance,
                    max_workers=1, max_in_flight_bytes=1)
        except Exception as e:  # onnx_ir wraps what a lazy tensor raised; a bad weight is the user's one line
            bad = _cause(e, WeightError)
            if bad is None:
                raise
            raise bad from None
        progress.update(task, completed=total)
    del graph
    if check:
        onnx.checker.check_model(str(tmp / ONNX_FILE), full_check=False)
    extra = _copy_side_files(model_dir, tmp)
    manifest = build_manifest(tmp, cfg, dtype, ckpt, extra_info=extra)
    manifest["timings"] = {"trace_s": round(t_trace, 2), "export_s": round(time.perf_counter() - t0, 2)}
    return manifest


def _cause(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in ``e``'s chain of causes and contexts."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _copy_side_files(model_dir: Path, dst: Path) -> dict[str, Any]:
    """Tokenizer and generation configs, and tokenizer.json converted from tokenizer.model when present."""
    info: dict[str, Any] = {"copied": []}
    for name in COPIED_FILES:
        if (Path(model_dir) / name).is_file():
            (dst / name).write_bytes((Path(model_dir) / name).read_bytes())
            info["copied"].append(name)
    if (Path(model_dir) / "tokenizer.json").is_file():
        (dst / "tokenizer.json").write_bytes((Path(model_dir) / "tokenizer.json").read_bytes())
    elif (dst / "tokenizer.model").is_file():
        from glm_runtime.tokenizer import write_tokenizer_json

        write_tokenizer_json(dst / "tokenizer.model", dst / "tokenizer.json")
    info["tokenizer"] = (dst / "tokenizer.json").is_file()
    if not info["tokenizer"]:
        console.print(f"[yellow]note:[/] {model_dir} has no tokenizer files: the artifact generates from "
                      f"token ids only (glm-runtime generate --prompt-ids)")
    return info


def graph_io(path: Path) -> dict[str, Any]:
    m = onnx.load(str(path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    ops = sorted({n.op_type for n in m.graph.node})
    return {"file": ONNX_FILE, "opset": OPSET, "inputs": describe(m.graph.input),
            "outputs": describe(m.graph.output), "ops": ops}


def build_manifest(artifact: Path, cfg: ModelConfig, dtype: str, ckpt: Checkpoint,
                   extra_info: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime

    return {
        "schema_version": mf.SCHEMA_VERSION,
        "producer": {"name": "glm-export", "version": glm_export.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(Path(ckpt.dir).absolute()), "layout": ckpt.layout},
        "model": cfg.to_dict(),
        "precision": {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype],
        "dtype": dtype,
        "graph": graph_io(artifact / ONNX_FILE),
        "tokenizer": extra_info["tokenizer"],
    }


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> None:
    """Hash every file and write manifest.json last: its presence is what marks the artifact complete."""
    files = sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != mf.MANIFEST)
    manifest["files"] = {str(p.relative_to(artifact)): mf.file_entry(p) for p in files}
    atomic.write_text(artifact / mf.MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
