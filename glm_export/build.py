"""``glm-export build``: export -> (quantize -> engine) -> validate -> report -> manifest, as one atomic step.

Everything is written into a staging directory that becomes the artifact only when every step succeeded,
with ``manifest.json`` written last; a failed or interrupted build leaves the previous artifact (or none).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from glm_export import atomic
from glm_export.builtin import resolve_model
from glm_export.checkpoint import Checkpoint, load_model
from glm_export.engine import EngineSpec, build_engine, check_engine, choose_backend
from glm_export.export import ONNX_FILE, export_into, graph_io, write_manifest
from glm_export.progress import console
from glm_export.quantize import (
    QUANTIZED_PRECISIONS,
    QuantizeError,
    QuantOptions,
    check_options,
    options_for_backend,
    quantize_into,
)
from glm_export.validate import OrtGraph, compare
from glm_runtime.engine import available_memory_bytes

FLOAT_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
VALIDATE_PROMPTS = (16, 9, 13)
VALIDATE_DECODE = 16


class BuildError(RuntimeError):
    pass


def pick_backend(requested: str | None, precision: str) -> tuple[str, str]:
    """``choose_backend``, except that an automatic choice never lands fp32 on TensorRT (no fp32 attention)."""
    backend, why = choose_backend(requested)
    if requested is None and precision == "fp32" and backend != "onnxruntime":
        return "onnxruntime", f"fp32 runs on ONNX Runtime (TensorRT has no fp32 attention; {backend} needs fp16, " \
                              "bf16 or a quantized precision)"
    return backend, why


def build_artifact(model: Path | None, out: Path, precision: str = "fp32", overwrite: bool = False,
                   validate: bool = True, quant: QuantOptions | None = None, backend: str | None = None,
                   engine: EngineSpec | None = None) -> dict[str, Any]:
    """The whole pipeline; ``backend=None`` picks one (and says which and why)."""
    if precision not in FLOAT_PRECISIONS and precision not in QUANTIZED_PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}: choose one of "
                         f"{', '.join([*FLOAT_PRECISIONS, *QUANTIZED_PRECISIONS])}")
    backend, why = pick_backend(backend, precision)
    console.print(f"backend: {backend} ({why})")
    spec = None
    if backend != "onnxruntime":
        base = engine or EngineSpec(backend=backend)
        spec = EngineSpec(backend, base.max_batch, base.max_context, base.max_prefill, base.targets)
    quant = options_for_backend(quant or QuantOptions(), backend)
    if spec is not None and spec.targets and quant.target_compute_capability is None:
        quant = replace(quant, target_compute_capability=min(float(t) for t in spec.targets))
    if precision in QUANTIZED_PRECISIONS:
        try:
            check_options(precision, quant)
        except QuantizeError as e:
            raise BuildError(str(e)) from None
    model_dir = resolve_model(model)
    if spec is not None:
        spec.check(precision, Checkpoint(model_dir).config.max_position)
    t0 = time.perf_counter()
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        # Quantized graphs start from the fp32 graph for ONNX Runtime (CPU) and from the fp16 one for TensorRT
        # (no fp32 attention there); the Q/DQ nodes carry the precision.
        base = "float32" if backend == "onnxruntime" else "float16"
        manifest = export_into(model_dir, tmp, FLOAT_PRECISIONS.get(precision, base))
        manifest["backend"] = backend
        report: dict[str, Any] = {"precision": precision, "validation": None}
        if precision in QUANTIZED_PRECISIONS:
            try:
                report["quantization"] = quantize_into(model_dir, tmp, precision, quant)
            except QuantizeError as e:
                raise BuildError(str(e)) from None
            manifest["precision"] = precision
            manifest["graph"] = graph_io(tmp / ONNX_FILE)
        if validate:
            report["validation"] = validate_artifact(model_dir, tmp, precision)
        if spec is not None:
            entry = build_engine(tmp, spec, precision, manifest["model"]["max_position"])
            entry["check"] = check_engine(tmp, entry)
            manifest["engines"] = [entry]
            report["engine"] = entry
        report["build_s"] = round(time.perf_counter() - t0, 2)
        quant_md = report.get("quantization", {}).pop("markdown", "")
        atomic.write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")
        atomic.write_text(tmp / "report.md", report_markdown(report, quant_md))
        write_manifest(tmp, manifest)
    console.print(f"[green]built[/] {out} ({precision}) in {time.perf_counter() - t0:.1f} s")
    return manifest


def validate_artifact(model_dir: Path, artifact: Path, precision: str) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch on random prompts: max logit difference and greedy agreement."""
    ckpt = Checkpoint(model_dir)
    if precision in QUANTIZED_PRECISIONS:
        return {"status": "by accuracy", "reason": "a quantized graph is compared with the fp32 model by the "
                                                   "accuracy measurements below, not by logit identity"}
    if precision != "fp32":
        return {"status": "skipped", "reason": f"ONNX Runtime CPU validation covers fp32 graphs; {precision} "
                                                "graphs are validated on the engine that runs them"}
    need = 2 * 4 * ckpt.config.num_parameters()  # fp32 PyTorch model + ORT session
    if need > 0.8 * available_memory_bytes():
        return {"status": "skipped", "reason": f"needs ~{need / 2**30:.0f} GiB (PyTorch + ONNX Runtime in fp32), "
                                                f"{available_memory_bytes() / 2**30:.0f} GiB available"}
    console.print("validating: ONNX Runtime vs PyTorch, prefill + decode")
    gen = torch.Generator().manual_seed(0)
    vocab = ckpt.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in VALIDATE_PROMPTS]
    result = compare(load_model(ckpt, torch.float32), OrtGraph(artifact), prompts, VALIDATE_DECODE)
    status = "ok" if result.max_abs <= 1e-3 and result.greedy_match else "mismatch"
    if status != "ok":
        raise BuildError(f"validation failed: max |logit diff| {result.max_abs:.3g}, greedy match "
                         f"{result.greedy_match}; the artifact was not written")
    return {"status": status, "prompts": list(VALIDATE_PROMPTS), "decode_steps": VALIDATE_DECODE, **result.to_dict()}


def report_markdown(report: dict[str, Any], extra: str = "") -> str:
    lines = [f"# glm-export build report ({report['precision']})", ""]
    v = report.get("validation")
    if not v:
        lines.append("Validation: not run (--no-validate).")
    elif v["status"] != "ok":
        lines.append(f"Validation: {v['status']}: {v['reason']}.")
    else:
        lines += [
            "Validation: ONNX Runtime (CPU) against the PyTorch model, same weights, fp32, "
            f"a batch of {len(v['prompts'])} right-padded random prompts of {v['prompts']} tokens, "
            f"then {v['decode_steps']} greedy decode steps.",
            "",
            "| max abs logit diff (prefill) | max abs logit diff (decode) | greedy tokens identical |",
            "|---|---|---|",
            f"| {v['prefill_max_abs']:.3g} | {max(v['decode_max_abs']):.3g} | {v['greedy_match']} "
            f"({v['greedy_tokens']} per sequence) |",
        ]
    e = report.get("engine")
    if e:
        check = e["check"]
        ran = ("Its logits could not be compared with ONNX Runtime here: no GPU on the build host, so the "
               "engine was built ahead of time and has not run.") if not check.get("gpu_checked") else ""
        lines += ["", f"Engine: {e['flavour']} {e['version']}, {e['precision']}, targets {', '.join(e['targets'])}, "
                  f"{e['bytes'] / 1e6:.1f} MB, built in {e['build_s']} s. Header check: "
                  f"{'well-formed' if check.get('well_formed') else 'INVALID'} "
                  f"(diagnostics: {', '.join(check.get('diagnostics', [])) or 'none'}). {ran}"]
    if extra:
        lines += ["", extra.rstrip()]
    lines += ["", f"Build time: {report['build_s']} s.", ""]
    return "\n".join(lines)
