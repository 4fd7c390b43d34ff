"""``glm-export build``: export -> (quantize) -> validate -> (engine) -> report -> manifest, atomic and resumable.

Everything is written into a staging directory (``.NAME.build``) that becomes the artifact only when every step
succeeded, with ``manifest.json`` written last; a failed or interrupted build leaves the previous artifact (or
none) and keeps its finished steps, which the next run with the same inputs reuses (:mod:`glm_export.resume`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from glm_export import atomic, numerics
from glm_export.builtin import resolve_model
from glm_export.checkpoint import Checkpoint, CheckpointError, load_model
from glm_export.engine import EngineSpec, build_engine, check_engine, choose_backend
from glm_export.export import ONNX_DATA, ONNX_FILE, export_into, graph_io, write_manifest
from glm_export.progress import console
from glm_export.quantize.rewrite import (
    QUANTIZED_PRECISIONS,
    QuantizeError,
    QuantOptions,
    check_options,
    cpu_tuning,
    options_for_backend,
    quantize_into,
    resolve_host_options,
    resolve_lm_head,
    resolve_weight_block,
    uses_gptq,
)
from glm_export.resume import STAGES, BuildJournal, fingerprint_dir, fingerprint_file, step_key
from glm_export.validate import OrtGraph, compare, compare_engine
from glm_export.weight_check import WeightError
from glm_runtime.engine import available_memory_bytes

FLOAT_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
VALIDATE_PROMPTS = (16, 9, 13)
VALIDATE_DECODE = 16


class BuildError(RuntimeError):
    """A build that cannot finish; ``resumable=False`` when running it again would fail the same way."""

    def __init__(self, message: str, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable


def pick_backend(requested: str | None, precision: str) -> tuple[str, str]:
    """``choose_backend``, except that an automatic choice never lands fp32 on TensorRT (no fp32 attention)."""
    backend, why = choose_backend(requested)
    if requested is None and precision == "fp32" and backend != "onnxruntime":
        return "onnxruntime", f"fp32 runs on ONNX Runtime (TensorRT has no fp32 attention; {backend} needs fp16, " \
                              "bf16 or a quantized precision)"
    return backend, why


def build_artifact(model: Path | None, out: Path, precision: str = "fp32", overwrite: bool = False,
                   validate: bool = True, quant: QuantOptions | None = None, backend: str | None = None,
                   engine: EngineSpec | None = None, resume: bool = True,
                   max_weight_abs: float | None = None, stream: bool | None = None,
                   memory_check: bool = True, eval_text: Path | None = None,
                   eval_ctx: int = 256) -> dict[str, Any]:
    """The whole pipeline; ``backend=None`` picks one (and says which and why).

    ``eval_text``: also measure held-out perplexity of the graph against the PyTorch checkpoint on this raw
    text (:mod:`glm_export.evaluate`, windows of ``eval_ctx`` tokens) into report.json / report.md.

    ``resume``: reuse the steps an earlier, failed or interrupted build of the same output finished with the
    same inputs (:mod:`glm_export.resume`); ``False`` starts over. ``max_weight_abs``: also refuse weights of
    larger magnitude (non-finite ones always are: :mod:`glm_export.weight_check`).
    ``stream``: quantize layer by layer (:mod:`glm_export.quantize.stream`; the same artifact, for ONNX Runtime
    or TensorRT, without the float model in memory or on disk); ``None`` streams when the whole-model path would
    not fit.
    ``memory_check``: refuse up front, with the numbers, a build whose estimated peak RAM or disk does not fit
    (:mod:`glm_export.budget`).
    """
    if precision not in FLOAT_PRECISIONS and precision not in QUANTIZED_PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}: choose one of "
                         f"{', '.join([*FLOAT_PRECISIONS, *QUANTIZED_PRECISIONS])}")
    backend, why = pick_backend(backend, precision)
    console.print(f"backend: {backend} ({why})")
    spec = None
    if backend != "onnxruntime":
        base = engine or EngineSpec(backend=backend)
        spec = EngineSpec(backend, base.max_batch, base.max_context, base.max_prefill, base.targets, base.weights)
    quant = resolve_host_options(options_for_backend(quant or QuantOptions(), backend))
    if spec is not None and spec.targets and quant.target_compute_capability is None:
        quant = replace(quant, target_compute_capability=min(float(t) for t in spec.targets))
    if precision in QUANTIZED_PRECISIONS:
        try:
            check_options(precision, quant)
        except QuantizeError as e:
            raise BuildError(str(e)) from None
    model_dir = resolve_model(model)
    if eval_text is not None and not Path(eval_text).is_file():
        raise BuildError(f"--eval-text {eval_text} not found: pass a UTF-8 text file")
    cfg = Checkpoint(model_dir).config
    # the block size decides the bytes the estimates below use (and the resume fingerprint records it)
    quant = replace(quant, weight_block=resolve_weight_block(quant, cfg, precision).weight_block)
    if precision in QUANTIZED_PRECISIONS and backend != "onnxruntime" and quant.accuracy_samples:
        quant = tensorrt_form_accuracy(cfg, quant)
    if spec is not None:
        if spec.weights == "auto":
            from glm_export import budget
            from glm_export.engine import choose_weights

            weights = budget.artifact_bytes(cfg, precision, quant.weight_block,
                                            lm_head=resolve_lm_head(quant, cfg, precision).lm_head
                                            if precision in QUANTIZED_PRECISIONS else "same")
            spec = replace(spec, weights=choose_weights(weights, precision in QUANTIZED_PRECISIONS,
                                                        "--engine-weights"))
        spec.check(precision, cfg.max_position)
    streamed = plan_memory(cfg, out, precision, backend, quant, stream, memory_check,
                           spec.weights if spec is not None else "embedded")
    # Quantized graphs start from the fp32 graph for ONNX Runtime (CPU) and from the fp16 one for TensorRT
    # (no fp32 attention there); the Q/DQ nodes carry the precision.
    export_dtype = FLOAT_PRECISIONS.get(precision, "float32" if backend == "onnxruntime" else "float16")
    steps = plan_steps(model_dir, export_dtype, quant if precision in QUANTIZED_PRECISIONS else None, validate, spec,
                       max_weight_abs, streamed)
    t0 = time.perf_counter()
    current = "export"
    try:
        with atomic.staging_dir(out, overwrite=overwrite, resume=resume) as tmp:
            journal = BuildJournal(tmp)
            reused = journal.plan(steps)
            if reused:
                console.print(f"resuming an earlier build of {out}: reusing {', '.join(reused)} "
                              "(--no-resume starts over)")
            total = len(steps)

            def step(name: str, fn: Callable[[], Any]) -> Any:
                nonlocal current
                current = name
                i = [n for n, _ in steps].index(name) + 1
                if name not in reused:
                    console.rule(f"step {i}/{total}: {name}", style="dim")
                return journal.run(name, dict(steps)[name], fn)

            quantized = precision in QUANTIZED_PRECISIONS
            exported = tmp / STAGES / "export" if quantized else tmp  # kept whole for re-quantizing on resume

            def export() -> dict[str, Any]:
                result = export_into(model_dir, tmp, export_dtype, max_weight_abs=max_weight_abs)
                if quantized:
                    exported.mkdir(parents=True, exist_ok=True)
                    for name in (ONNX_FILE, ONNX_DATA):
                        if (tmp / name).exists():
                            os.replace(tmp / name, exported / name)
                return result

            report: dict[str, Any] = {"precision": precision, "validation": None}
            if streamed:
                def quantize_streamed() -> dict[str, Any]:
                    from glm_export.quantize.stream import quantize_streamed

                    try:  # the journal keeps each finished layer: a killed build resumes after it
                        built, section = quantize_streamed(model_dir, tmp, precision, quant,
                                                           progress=journal.partial(dict(steps)["quantize"]))
                    except QuantizeError as e:
                        raise BuildError(str(e)) from None
                    return {"manifest": built, "report": section}

                done = step("quantize", quantize_streamed)
                manifest = done["manifest"]
                report["quantization"] = dict(done["report"])
                manifest["precision"] = precision
                if precision == "int8" and quant.backend == "onnxruntime":
                    manifest["cpu_tuning"] = cpu_tuning(quant)
            else:
                manifest = step("export", export)
            manifest["backend"] = backend
            if quantized and not streamed:
                def quantize() -> dict[str, Any]:
                    try:
                        section = quantize_into(model_dir, tmp, precision, quant, source=exported)
                    except QuantizeError as e:
                        raise BuildError(str(e)) from None
                    return {"report": section, "graph": graph_io(tmp / ONNX_FILE)}

                done = step("quantize", quantize)
                report["quantization"] = dict(done["report"])
                manifest["precision"] = precision
                manifest["graph"] = done["graph"]
                if precision == "int8" and quant.backend == "onnxruntime":
                    manifest["cpu_tuning"] = cpu_tuning(quant)
            if validate:
                report["validation"] = step("validate", lambda: validate_artifact(model_dir, tmp, precision))
            if eval_text is not None:
                current = "eval"
                console.rule("eval: held-out perplexity against the PyTorch checkpoint", style="dim")
                report["eval"] = eval_artifact(model_dir, tmp, manifest, Path(eval_text), eval_ctx)
            if spec is not None:
                def engine_step() -> dict[str, Any]:
                    entry = build_engine(tmp, spec, precision, manifest["model"]["max_position"])
                    entry["check"] = check_engine(tmp, entry)
                    return entry

                entry = step("engine", engine_step)
                manifest["engines"] = [entry]
                report["engine"] = entry
                current = "engine validation"
                report["engine_validation"] = validate_engine(tmp, entry, manifest)
            current = "report"
            report["build_s"] = round(time.perf_counter() - t0, 2)
            if reused:
                report["resumed"] = reused
            quant_md = report.get("quantization", {}).pop("markdown", "")
            journal.finish()
            atomic.write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")
            atomic.write_text(tmp / "report.md", report_markdown(report, quant_md))
            write_manifest(tmp, manifest)
    except (KeyboardInterrupt, Exception) as e:
        staged = Path(out).absolute().parent / f".{Path(out).name}.build"
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # D12: sizes and a way out, not a traceback
            itemsize = 4 if export_dtype == "float32" else 2
            need = Checkpoint(model_dir).config.num_parameters() * itemsize * (2 if precision in
                                                                                QUANTIZED_PRECISIONS else 1)
            raise BuildError(atomic.disk_full_message(staged, need, current)) from None
        if staged.is_dir() and not isinstance(e, atomic.BuildInProgressError | atomic.OutputExistsError):
            if isinstance(e, CheckpointError | WeightError) or not getattr(e, "resumable", True):
                # Resuming would meet the same input again: say what to fix instead (issue 19, D8).
                console.print(f"[yellow]build stopped during step {current!r}[/]: {out} was not written. Running "
                              "the same command again cannot succeed until the problem below is fixed (the "
                              f"finished steps stay in {staged}).", soft_wrap=True, highlight=False)
            else:
                console.print(f"[yellow]build stopped during step {current!r}[/]: {out} was not written. The "
                              f"finished steps are kept in {staged}; run the same command again to resume from "
                              f"{current!r}, or with --no-resume to start over.", soft_wrap=True, highlight=False)
        raise
    console.print(f"[green]built[/] {out} ({precision}) in {time.perf_counter() - t0:.1f} s")
    return manifest


def tensorrt_form_accuracy(cfg: Any, quant: QuantOptions) -> QuantOptions:
    """The accuracy report of a TensorRT-form graph runs it in ONNX Runtime CPU, which holds its weights
    dequantized (:func:`glm_export.budget.tensorrt_form_on_cpu`); when that does not fit in 80 % of the available
    RAM the report is skipped, said here and in report.json, instead of the build being killed at its end."""
    from glm_export import budget

    need = budget.tensorrt_form_on_cpu(cfg)
    available = available_memory_bytes()
    if need <= 0.8 * available:
        return quant
    console.print(f"accuracy report: skipped (ONNX Runtime CPU would hold the TensorRT form's weights dequantized, "
                  f"~{budget.gib(need)}, {budget.gib(available)} is available); measure on the GPU host with "
                  "glm-export eval ARTIFACT --text FILE --reference CHECKPOINT")
    return replace(quant, accuracy_samples=0, accuracy_skipped=f"ONNX Runtime CPU would hold the TensorRT form's "
                   f"weights dequantized (~{budget.gib(need)}, {budget.gib(available)} available): measure on the "
                   "GPU host with glm-export eval")


def weights_note(entry: dict[str, Any]) -> str:
    w = entry.get("weights") or {}
    if w.get("mode") != "inputs":
        return "weights embedded"
    return (f"weights as {len(w['tensors'])} network inputs ({w['bytes'] / 1e9:.2f} GB uploaded to the GPU and bound "
            "by the runtime at load)")


def plan_memory(cfg: Any, out: Path, precision: str, backend: str, quant: QuantOptions, stream: bool | None,
                memory_check: bool, engine_weights: str = "embedded") -> bool:
    """Whether to stream (see :func:`build_artifact`), after checking the build fits in RAM and on disk."""
    from glm_export import budget

    can_stream = precision in QUANTIZED_PRECISIONS
    if stream and not can_stream:
        raise BuildError(f"--stream quantizes layer by layer; an unquantized {precision} build has nothing to "
                         "quantize (its export already streams the weights): drop --stream")
    args = dict(calib_samples=quant.calib_samples, calib_seq_len=quant.calib_seq_len,
                accuracy_samples=quant.accuracy_samples, weight_block=quant.weight_block,
                engine_weights=engine_weights, gptq=uses_gptq(quant),
                lm_head=resolve_lm_head(quant, cfg, precision).lm_head if can_stream else "same")
    available = available_memory_bytes()
    if stream is None:
        whole = budget.estimate(cfg, precision, backend, False, **args)
        stream = can_stream and whole.peak > 0.8 * available
    est = budget.estimate(cfg, precision, backend, bool(stream), **args)
    if stream:
        console.print(f"streaming: quantizing layer by layer (estimated peak {budget.gib(est.peak)}, "
                      f"{budget.gib(available)} available)")
    if memory_check:
        try:
            budget.check(est, available, budget.free_disk(out), cfg, precision, backend, engine_weights)
        except budget.BudgetError as e:
            raise BuildError(str(e)) from None
    return bool(stream)


def plan_steps(model_dir: Path, export_dtype: str, quant: QuantOptions | None, validate: bool,
               spec: EngineSpec | None, max_weight_abs: float | None = None,
               streamed: bool = False) -> list[tuple[str, str]]:
    """The build's steps with their input keys, each chained to the previous one (see :mod:`glm_export.resume`)."""
    import glm_export
    from glm_export.engine import import_trt

    key = step_key("export", glm_export.__version__, fingerprint_dir(model_dir), export_dtype)
    if max_weight_abs is not None:  # a stricter check must not be skipped by reusing an unchecked export
        key = step_key(key, "max_weight_abs", max_weight_abs)
    steps = [("export", key)]
    if streamed:  # one step: calibrate, trace and quantize layer by layer, no float32 export in between
        steps = []
        key = step_key(key, "streamed")
    if quant is not None:
        options = asdict(quant)
        calib = Path(quant.calibration)
        options["calibration_sha256"] = fingerprint_file(calib) if calib.is_file() else quant.calibration
        key = step_key(key, "quantize", options)
        steps.append(("quantize", key))
    if streamed and quant is None:
        raise ValueError("a streamed build is a quantized one")
    if validate:
        key = step_key(key, "validate")
        steps.append(("validate", key))
    if spec is not None:
        version = getattr(import_trt(spec.backend), "__version__", "?")
        key = step_key(key, "engine", asdict(spec), version)
        steps.append(("engine", key))
    return steps


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
    # The bound float32 rounding allows at this model's size and logit scale (numerics.py), not a fixed number:
    # kernels differ by CPU, and a 40-layer model legitimately differs more than a 2-layer one.
    bound = numerics.fp32_logit_bound(ckpt.config, result.context, result.reference_absmax)
    if not (math.isfinite(result.max_abs) and math.isfinite(result.reference_absmax)):
        # The weights passed the finiteness check, so the arithmetic itself overflows (e.g. weights of
        # implausible magnitude): the same graph would fail again, so no resume advice.
        raise BuildError("validation failed: the logits are not finite (NaN or Inf) in "
                         f"{'PyTorch and ' if not math.isfinite(result.reference_absmax) else ''}ONNX Runtime: the "
                         "model's activations overflow with these weights; check the checkpoint (glm-export build "
                         "--max-weight-abs finds implausible weights)", resumable=False)
    status = "ok" if result.max_abs <= bound and result.greedy_match else "mismatch"
    if status != "ok":
        raise BuildError(f"validation failed: max |logit diff| {result.max_abs:.3g} (float32 rounding allows "
                         f"{bound:.3g}), greedy match {result.greedy_match}; the artifact was not written. The same "
                         "graph would fail again: please report it with `glm-export env`", resumable=False)
    return {"status": status, "prompts": list(VALIDATE_PROMPTS), "decode_steps": VALIDATE_DECODE,
            "bound": bound, **result.to_dict()}


def validate_engine(artifact: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """Where the engine can run (an NVIDIA GPU here), its logits against ONNX Runtime running the same graph.

    A mismatch is reported loudly rather than failing the build: the tolerance of fused fp16/FP8 kernels on a
    given GPU is a judgement for the user, and the numbers are in the report.
    """
    from glm_export.engine import gpu_present

    if not gpu_present():
        return {"status": "not run", "reason": "no NVIDIA GPU on the build host: the engine was built ahead of "
                                               "time and has not run; run `glm-export engine` on the GPU host"}
    from glm_runtime.engine_trt import TensorRTError, TrtEngine
    from glm_runtime.manifest import model_config

    console.print("validating the engine: TensorRT vs ONNX Runtime on the same graph")
    try:
        engine = TrtEngine(artifact, entry, model_config(manifest))
    except TensorRTError as e:
        return {"status": "not run", "reason": str(e)}
    vocab = manifest["model"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in VALIDATE_PROMPTS]
    result = compare_engine(engine, OrtGraph(artifact), prompts, VALIDATE_DECODE)
    status = "ok" if result.greedy_match else "mismatch"
    if status != "ok":
        console.print(f"[yellow]warning:[/] the engine's greedy tokens differ from ONNX Runtime's on the same graph "
                      f"(max |logit diff| {result.max_abs:.3g}); see report.md")
    return {"status": status, "prompts": list(VALIDATE_PROMPTS), "decode_steps": VALIDATE_DECODE, **result.to_dict()}


def eval_artifact(model_dir: Path, artifact: Path, manifest: dict[str, Any], text: Path, ctx: int) -> dict[str, Any]:
    """``glm-export eval`` of the staged graph (its manifest is not written yet) against the checkpoint."""
    from glm_export.evaluate import EvalError, OrtScorer, TorchScorer, evaluate_ids, tokenize_text
    from glm_runtime.manifest import model_config

    try:
        ids = tokenize_text(text, model_dir)
        res = evaluate_ids(OrtScorer(artifact, cfg=model_config(manifest)), ids, ctx, TorchScorer(model_dir),
                           text_name=str(text))
    except EvalError as e:
        raise BuildError(f"--eval-text: {e}") from None
    return res.to_dict()


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
        lines += ["", f"Engine: {e['flavour']} {e['version']}, {e['precision']}, targets {', '.join(e['targets'])}, "
                  f"{e['bytes'] / 1e6:.1f} MB, built in {e['build_s']} s, {weights_note(e)}. Header check: "
                  f"{'well-formed' if check.get('well_formed') else 'INVALID'} "
                  f"(diagnostics: {', '.join(check.get('diagnostics', [])) or 'none'})."]
        ev = report.get("engine_validation") or {}
        if ev.get("status") in ("ok", "mismatch"):
            lines += ["", f"Engine validation: {ev['status'].upper()}: the engine against ONNX Runtime (CPU) running "
                      f"the same graph, prompts of {ev['prompts']} tokens one at a time, then {ev['decode_steps']} "
                      "greedy steps.", "",
                      "| max abs logit diff (prefill) | max abs logit diff (decode) | greedy tokens identical |",
                      "|---|---|---|",
                      f"| {ev['prefill_max_abs']:.3g} | {max(ev['decode_max_abs']):.3g} | {ev['greedy_match']} |"]
        elif ev:
            lines += ["", f"Engine validation: not run: {ev['reason']}."]
    if extra:
        lines += ["", extra.rstrip()]
    if report.get("eval"):
        from glm_export.evaluate import EvalResult, markdown

        lines += ["", *markdown(EvalResult(**report["eval"]))]
    lines += ["", f"Build time: {report['build_s']} s.", ""]
    return "\n".join(lines)
