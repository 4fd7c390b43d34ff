"""``glm-export``: the command line. Validates input at the edge and turns known errors into one clear line."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from glm_export.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="GLM-4 checkpoints to ONNX, quantized graphs and TensorRT engines.")

F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = "Checkpoint directory; the built-in tiny model when omitted."
MAX_WEIGHT_ABS_HELP = ("Also refuse checkpoint weights of larger magnitude (NaN and Inf are always refused); trained "
                       "GLM-4 weights stay well under 100.")
PRESET_HELP = "Shapes: tiny (tests), glm-4-9b-2layer (3.3 GB), glm-4-9b (18.8 GB)."
LAYOUT_HELP = "Tensor names: chatglm (THUDM original) or hf (transformers GlmForCausalLM)."
TOKENIZER_FROM_HELP = ("Copy tokenizer.model / tokenizer_config.json from this directory (e.g. a real GLM-4 "
                       "checkpoint) instead of writing the built-in tokenizer.")
NO_TOKENIZER_HELP = "Write no tokenizer files (a checkpoint usable from token ids only)."
DTYPE_HELP = "Weight/activation dtype of the graph (float32 runs on ONNX Runtime CPU)."
OVERWRITE_HELP = "Replace OUT if it exists (only once the new one is complete)."
BACKEND_HELP = ("Engine backend. Default: tensorrt with a GPU, else tensorrt-rtx when installed, else onnxruntime "
                "(fp32 always runs on onnxruntime).")
MAX_BATCH_HELP = "Largest batch the TensorRT engine accepts."
MAX_CONTEXT_HELP = "KV-cache length the TensorRT engine is built for (prompt + new tokens)."
MAX_PREFILL_HELP = "Longest prefill chunk of the TensorRT engine's prefill profile."
CALIBRATION_HELP = "Calibration data: 'default' (shipped set), a .jsonl of chat messages / {'text': ...}, or a .txt."
KV_CACHE_HELP = ("KV cache storage of a quantized artifact: model (the graph's float type) or int8 (static "
                 "calibrated scales, half of fp16's memory per token; ONNX Runtime only).")
RESUME_HELP = ("Reuse the steps a failed or interrupted build of the same OUT finished with the same inputs "
               "(kept in .OUT.build); --no-resume starts over.")
TARGET_HELP = "Compute capability to build for (TensorRT-RTX ahead-of-time), repeatable: 8.6, 8.9, 12.0 ..."


class Preset(str, Enum):
    tiny = "tiny"
    glm_4_9b_2layer = "glm-4-9b-2layer"
    glm_4_9b = "glm-4-9b"


class Layout(str, Enum):
    chatglm = "chatglm"
    hf = "hf"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Backend(str, Enum):
    tensorrt = "tensorrt"
    tensorrt_rtx = "tensorrt-rtx"
    onnxruntime = "onnxruntime"


class WeightMethod(str, Enum):
    awq = "awq"
    rtn = "rtn"
    gptq = "gptq"
    awq_gptq = "awq-gptq"


class WeightClip(str, Enum):
    mse = "mse"
    none = "none"


WEIGHT_CLIP_HELP = ("int4 block scales: mse (per-block clip search, least-squares scale) or none (abs-max / 7).")
WEIGHT_ZERO_POINT_HELP = ("int4 zero points (asymmetric blocks): lower error, ~10% slower decoding in ONNX Runtime; "
                          "not available for TensorRT (its DequantizeLinear takes none). Default: off.")


class LMHead(str, Enum):
    auto = "auto"
    same = "same"
    float = "float"
    int8 = "int8"


WEIGHT_BLOCK_HELP = ("int4 block size: auto (128 when the output layer is int8 and rows are >= 1024 wide, as on "
                     "GLM-4-9B: 11 % fewer bytes, faster decode; else 32), 32 (the most accurate), 64 or 128. "
                     "See docs/quantization.md, \"Block size\".")


def parse_weight_block(value: str) -> int:
    """``--weight-block`` as QuantOptions takes it (0 = auto); other numbers are refused by check_options, with
    the choices, so the error reads the same from the CLI and from Python."""
    from glm_export.quantize.rewrite import WEIGHT_BLOCK_AUTO

    if value.strip().lower() == "auto":
        return WEIGHT_BLOCK_AUTO
    try:
        block = int(value)
    except ValueError:
        block = WEIGHT_BLOCK_AUTO
    if block == WEIGHT_BLOCK_AUTO:
        raise typer.BadParameter(f"{value!r}: choose auto, 32, 64 or 128", param_hint="--weight-block")
    return block


LM_HEAD_HELP = ("Output layer (lm_head) precision in a quantized artifact: auto (int8 in fp8 artifacts, and in int4 "
                "ones when the output layer is at most 25% of the weights a decode step reads, as on GLM-4-9B; "
                "else same), same (as the rest), float (unquantized: "
                "stored in the checkpoint's 16-bit type, widened to fp32 by ONNX Runtime at load; fp16 on TensorRT) or "
                "int8 (W8A8 per-channel, SmoothQuant; for int4 / fp8). "
                "See docs/quantization.md for what each costs in accuracy, bytes and speed.")


class EngineWeights(str, Enum):
    auto = "auto"
    embedded = "embedded"
    inputs = "inputs"


ENGINE_WEIGHTS_HELP = ("TensorRT engine weights: embedded in the plan (the builder holds them ~3.9x over: a 9B fp16 "
                       "engine needs ~69 GB of RAM to build), or inputs (a weightless plan, built in < 1 GB; the "
                       "runtime uploads the artifact's weights to the GPU and binds them). auto: embedded when that "
                       "build fits in the available RAM, else inputs.")


class KVCacheDType(str, Enum):
    model = "model"
    int8 = "int8"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    fp8 = "fp8"
    int8 = "int8"
    int4 = "int4"


def friendly_errors(fn: F) -> F:
    """Known error types become one red line and exit code 1 instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from glm_export.atomic import BuildInProgressError, OutputExistsError
        from glm_export.build import BuildError
        from glm_export.checkpoint import CheckpointError
        from glm_export.engine import EngineError
        from glm_export.weight_check import WeightError
        from glm_runtime.config import ConfigError
        from glm_runtime.manifest import ArtifactError

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, ConfigError, ArtifactError, OutputExistsError, FileNotFoundError, BuildError,
                EngineError, BuildInProgressError, WeightError) as e:
            console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            console.print(f"[bold red]error:[/] no space left on the device ({e.filename or 'the output'}): free "
                          "space or write the output to another disk (-o); nothing was published",
                          soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command("random-model")
@friendly_errors
def random_model(
    out: Annotated[Path, typer.Argument(help="Directory to write the checkpoint to.")],
    preset: Annotated[Preset, typer.Option(help=PRESET_HELP)] = Preset.tiny,
    layout: Annotated[Layout, typer.Option(help=LAYOUT_HELP)] = Layout.chatglm,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same weights in both layouts.")] = 0,
    tokenizer_from: Annotated[Path | None, typer.Option(help=TOKENIZER_FROM_HELP)] = None,
    no_tokenizer: Annotated[bool, typer.Option("--no-tokenizer", help=NO_TOKENIZER_HELP)] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a GLM-4 checkpoint in the real format with random weights."""
    from glm_export.random_model import write_random_model

    if tokenizer_from is not None and no_tokenizer:
        raise typer.BadParameter("--tokenizer-from and --no-tokenizer contradict each other")
    path = write_random_model(out, preset.value, layout.value, seed, tokenizer_from=tokenizer_from,
                              builtin_tokenizer=not no_tokenizer, overwrite=overwrite)
    console.print(f"wrote {preset.value} checkpoint ({layout.value} layout, seed {seed}) to {path}")


@app.command("export")
@friendly_errors
def export(
    model: Annotated[Path | None, typer.Argument(help=MODEL_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to create.")] = Path("glm4-onnx"),
    dtype: Annotated[DType, typer.Option(help=DTYPE_HELP)] = DType.float32,
    overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
    max_weight_abs: Annotated[float | None, typer.Option(help=MAX_WEIGHT_ABS_HELP, min=0)] = None,
) -> None:
    """Export a GLM-4 checkpoint to ONNX with KV-cache inputs/outputs, manifest and tokenizer files."""
    from glm_export.builtin import resolve_model
    from glm_export.export import export_onnx

    export_onnx(resolve_model(model), out, dtype.value, overwrite=overwrite, max_weight_abs=max_weight_abs)


@app.command("build")
@friendly_errors
def build(
    model: Annotated[Path | None, typer.Argument(help=MODEL_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to create.")] = Path("glm4-artifact"),
    precision: Annotated[Precision, typer.Option(help="Numeric precision of the artifact.")] = Precision.fp32,
    overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
    validate: Annotated[bool, typer.Option(help="Compare ONNX Runtime with PyTorch after building.")] = True,
    backend: Annotated[Backend | None, typer.Option(help=BACKEND_HELP)] = None,
    max_batch: Annotated[int, typer.Option(help=MAX_BATCH_HELP, min=1)] = 1,
    max_context: Annotated[int, typer.Option(help=MAX_CONTEXT_HELP, min=2)] = 4096,
    max_prefill: Annotated[int, typer.Option(help=MAX_PREFILL_HELP, min=1)] = 512,
    target: Annotated[list[str] | None, typer.Option(help=TARGET_HELP)] = None,
    engine_weights: Annotated[EngineWeights, typer.Option(help=ENGINE_WEIGHTS_HELP)] = EngineWeights.auto,
    calibration: Annotated[str, typer.Option(help=CALIBRATION_HELP)] = "default",
    calib_samples: Annotated[int, typer.Option(help="Calibration samples to use.", min=1)] = 256,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample (longer ones are cut).")] = 512,
    smoothquant_alpha: Annotated[float, typer.Option(help="int8 SmoothQuant migration strength (0 = none).")] = 0.5,
    weight_block: Annotated[str, typer.Option(help=WEIGHT_BLOCK_HELP)] = "auto",
    weight_method: Annotated[WeightMethod, typer.Option(
        help="int4 rounding: awq (activation-aware scales), rtn, gptq (error-compensating, act-order, static "
             "block scales) or awq-gptq (AWQ's scales, then GPTQ).")]
    = WeightMethod.awq_gptq,
    weight_clip: Annotated[WeightClip, typer.Option(help=WEIGHT_CLIP_HELP)] = WeightClip.mse,
    weight_zero_point: Annotated[bool | None, typer.Option(help=WEIGHT_ZERO_POINT_HELP, show_default=False)] = None,
    kv_cache_dtype: Annotated[KVCacheDType, typer.Option(help=KV_CACHE_HELP)] = KVCacheDType.model,
    lm_head: Annotated[LMHead, typer.Option(help=LM_HEAD_HELP)] = LMHead.auto,
    int8_reduce_range: Annotated[bool | None, typer.Option(
        "--int8-reduce-range/--int8-full-range", show_default=False,
        help="int8 weights in 7 bits (exact on every x86 CPU) or 8 bits (half the rounding error; needs a CPU with "
             "an int8 dot product: VNNI, AMX, Arm dotprod). Default: chosen for the build host, recorded in the "
             "manifest; the runtime warns on a CPU the artifact was not tuned for.")] = None,
    accuracy_samples: Annotated[int, typer.Option(help="Held-out sequences for the accuracy report (0: skip).")]
    = 8,
    resume: Annotated[bool, typer.Option(help=RESUME_HELP)] = True,
    max_weight_abs: Annotated[float | None, typer.Option(help=MAX_WEIGHT_ABS_HELP, min=0)] = None,
    stream: Annotated[bool | None, typer.Option(
        "--stream/--no-stream", show_default=False,
        help="Quantize one decoder layer at a time (the same artifact, for ONNX Runtime or TensorRT, never the "
             "float model in memory or on disk: what a 9B model needs on a 24 GB machine). Default: streams when "
             "the whole-model path would not fit in the available RAM.")] = None,
    skip_memory_check: Annotated[bool, typer.Option(
        help="Build even when the up-front estimate of peak RAM or disk (docs/memory.md) says it will not fit.")]
    = False,
    eval_text: Annotated[Path | None, typer.Option(help="Also measure held-out perplexity, KL and top-1 against the "
                                                   "PyTorch checkpoint on this raw text (as glm-export eval) into "
                                                   "the report.")] = None,
    eval_ctx: Annotated[int, typer.Option(help="Window of --eval-text, in tokens.", min=2)] = 256,
) -> None:
    """Export, (quantize), build engines and validate: the whole pipeline into one artifact directory."""
    from glm_export.build import build_artifact
    from glm_export.engine import EngineSpec
    from glm_export.quantize.rewrite import QuantOptions

    spec = EngineSpec("auto", max_batch, max_context, max_prefill, tuple(target or ()), engine_weights.value)
    quant = QuantOptions(calibration=calibration, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                         smoothquant_alpha=smoothquant_alpha, weight_block=parse_weight_block(weight_block),
                         weight_method=weight_method.value, weight_clip=weight_clip.value,
                         weight_zero_point=weight_zero_point, kv_cache=kv_cache_dtype.value, lm_head=lm_head.value,
                         int8_reduce_range=int8_reduce_range, accuracy_samples=accuracy_samples)
    build_artifact(model, out, precision.value, overwrite=overwrite, validate=validate,
                   backend=backend.value if backend else None, engine=spec, quant=quant, resume=resume,
                   max_weight_abs=max_weight_abs, stream=stream, memory_check=not skip_memory_check,
                   eval_text=eval_text, eval_ctx=eval_ctx)


@app.command("engine")
@friendly_errors
def engine(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory made by glm-export build / export.")],
    backend: Annotated[Backend, typer.Option(help="tensorrt (on the GPU host) or tensorrt-rtx.")] = Backend.tensorrt,
    max_batch: Annotated[int, typer.Option(help=MAX_BATCH_HELP, min=1)] = 1,
    max_context: Annotated[int, typer.Option(help=MAX_CONTEXT_HELP, min=2)] = 4096,
    max_prefill: Annotated[int, typer.Option(help=MAX_PREFILL_HELP, min=1)] = 512,
    target: Annotated[list[str] | None, typer.Option(help=TARGET_HELP)] = None,
    weights: Annotated[EngineWeights, typer.Option(help=ENGINE_WEIGHTS_HELP)] = EngineWeights.auto,
) -> None:
    """(Re)build only the TensorRT engine of an artifact, e.g. on the GPU host it will run on."""
    from glm_export.engine import (
        EngineError,
        EngineSpec,
        build_engine,
        check_engine,
        choose_backend,
        choose_weights,
        describe,
    )
    from glm_runtime.manifest import read_manifest

    if backend is Backend.onnxruntime:
        raise EngineError("onnxruntime needs no engine: the artifact's model.onnx is what it runs")
    choose_backend(backend.value)  # clear error when not installed
    manifest = read_manifest(artifact, verify="size")
    mode = weights.value
    if weights is EngineWeights.auto:
        data = sum(e["bytes"] for name, e in manifest["files"].items() if name.startswith("model.onnx"))
        mode = choose_weights(data, manifest["precision"] in ("int8", "fp8", "int4"), "--weights")
    spec = EngineSpec(backend.value, max_batch, max_context, max_prefill, tuple(target or ()), mode)
    entry = build_engine(artifact, spec, manifest["precision"], manifest["model"]["max_position"])
    entry["check"] = check_engine(artifact, entry)
    from glm_export.engine import update_manifest_engines

    update_manifest_engines(artifact, entry)
    console.print(f"engine: {describe(entry)}")


@app.command("env")
@friendly_errors
def env(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """What a bug report needs (as `vllm collect-env`): package versions, Python, the CPU and the ISA extensions
    ONNX Runtime dispatches on, execution providers, TensorRT / TensorRT-RTX, GPU and compute capability, RAM, disk.
    The same report as `glm-runtime env`, plus the torch build this side uses."""
    import json
    import sys

    from glm_runtime import hostinfo

    info = hostinfo.collect()
    try:
        import torch

        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    except Exception as e:  # a broken torch is a reason to run this command
        info["torch"] = {"error": f"{type(e).__name__}: {e}"}
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    t = info["torch"]
    extra = (f"torch: {t['version']} (CUDA {t['cuda'] or 'none'}, available {t['cuda_available']}, "
             f"{t['threads']} threads)" if "version" in t else f"torch: {t['error']}")
    sys.stdout.write(hostinfo.render(info) + "\n" + extra + "\n")


class EvalScore(str, Enum):
    all = "all"
    second_half = "second-half"


class EvalBackend(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


@app.command("eval")
@friendly_errors
def eval_command(
    model: Annotated[Path, typer.Argument(help="Artifact directory (ONNX Runtime, or its TensorRT engine on a GPU) "
                                          "or checkpoint directory (PyTorch fp32).")],
    text: Annotated[Path, typer.Option(help="UTF-8 text file, tokenized as plain text (no special tokens).")],
    ctx: Annotated[int, typer.Option(help="Tokens per non-overlapping window.", min=2)] = 256,
    reference: Annotated[Path | None, typer.Option(help="Artifact or checkpoint to compare with: adds KL, top-1 "
                                                   "agreement and Δ perplexity.")] = None,
    score: Annotated[EvalScore, typer.Option(help="Score every token after a window's first (all), or only the "
                                             "second half of each window (as llama-perplexity).")] = EvalScore.all,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate at most this many windows.", min=1)] = None,
    backend: Annotated[EvalBackend, typer.Option(help="For an artifact: auto (its TensorRT engine when a GPU is "
                                                 "here, else ONNX Runtime), onnxruntime or tensorrt.")]
    = EvalBackend.auto,
    threads: Annotated[int | None, typer.Option(help="CPU threads (ONNX Runtime / PyTorch).", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Held-out perplexity of a model on raw text (non-overlapping windows), with a reference also KL divergence,
    top-1 agreement and Δ perplexity, as llama-perplexity (--kl-divergence) reports them."""
    import json

    from glm_export.evaluate import EvalError, evaluate, markdown

    try:
        res = evaluate(model, text, ctx, reference, score.value, max_windows, backend.value, threads)
    except EvalError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(res.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(markdown(res)) + "\n")


class TorchDType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@app.command("bench")
@friendly_errors
def bench(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories (one per precision), measured "
                                                    "side by side with PyTorch.")],
    model: Annotated[Path | None, typer.Option(help="Checkpoint for the PyTorch side; default: the first "
                                               "artifact's source checkpoint.")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated: 1,4.")] = "1",
    prompt_len: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated: 128,1024.")] = "128",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run (stop ids ignored).", min=2)] = 128,
    repeats: Annotated[int, typer.Option(help="Alternating rounds (a fresh process per side each).", min=1)] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs per case before the timed one.", min=0)] = 1,
    threads: Annotated[int | None, typer.Option(help="Threads for every side; default: physical cores.",
                                                min=1)] = None,
    dtype: Annotated[TorchDType | None, typer.Option(help="PyTorch dtype; default fp32 on CPU, the "
                                                     "checkpoint's on GPU.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the PyTorch side (static cache).")] = False,
    attn: Annotated[str, typer.Option(help="transformers attn_implementation of the PyTorch side.")] = "eager",
    check_tokens: Annotated[int, typer.Option(help="Greedy tokens compared with PyTorch before timing.",
                                              min=1)] = 16,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for bench.json, bench.md, bench.png.")]
    = Path("bench"),
    seed: Annotated[int, typer.Option(help="Seed of the random prompt ids.")] = 0,
    probe_gib: Annotated[float, typer.Option(help="Buffer size of the bandwidth probes (GiB).", min=0.01)] = 1.0,
    profile: Annotated[bool, typer.Option("--profile", help="Also profile a decode step of each artifact "
                                          "(ONNX Runtime profiler): where the time goes.")] = False,
) -> None:
    """Latency and throughput of the artifacts' runtime against PyTorch on the same weights, side by side."""
    from glm_export.bench.run import BenchError, Settings, command_line, parse_int_list, run_and_report

    try:
        dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
        settings = Settings(list(artifacts), model, parse_int_list(batch, "--batch"),
                            parse_int_list(prompt_len, "--prompt-len"), new_tokens, repeats, warmup, threads,
                            dtypes[dtype.value] if dtype else None, compile, attn, check_tokens, seed, out, probe_gib,
                            profile, command_line(sys.argv[1:]))
        correct = run_and_report(settings)
    except BenchError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    if not correct:
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
