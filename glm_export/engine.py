"""TensorRT engines from the artifact's ONNX graph, written once for ``tensorrt`` and TensorRT for RTX.

Both flavours share the builder surface used here (Builder, OnnxParser, optimization profiles,
``build_serialized_network``, timing caches, progress monitors); TensorRT for RTX
(``tensorrt_rtx_bindings``) installs from PyPI and builds ahead-of-time on a machine without a GPU, which is
how CI builds real engines. Facts this module encodes (see ``docs/engines.md``):

- TensorRT's KV-cache update (what ONNX ``TensorScatter`` becomes) needs a *static* cache length, so the
  graph's ``cache_len`` is pinned to ``max_context`` before parsing; ONNX Runtime keeps it symbolic.
- TensorRT has no fused fp32 attention: engines are built from fp16 / bf16 graphs (quantized graphs carry
  their precision in Q/DQ nodes; the network is explicitly typed from the graph).
- Two optimization profiles: 0 = decode (one token per sequence), 1 = prefill (up to ``max_prefill``
  tokens). The runtime picks the profile per step.
- Weights either embedded in the plan (``weights="embedded"``: the builder holds them ~3.9x over, so a 9B engine
  needs ~69 GB of RAM to build) or declared network inputs (``weights="inputs"``: the plan is kernels and shapes
  only, built in under a GB for 9B; the runtime uploads the artifact's weight tensors once and binds them like
  the KV-cache buffers). The manifest entry lists each weight input's byte range: in ``model.onnx.data``, or
  in ``engine/<backend>/weights.bin`` for a small graph that keeps its weights inside ``model.onnx``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from glm_export import atomic
from glm_export.progress import console, count_progress
from glm_runtime import manifest as mf

BACKENDS = ("tensorrt", "tensorrt-rtx", "onnxruntime")
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
ENGINE_FILE = "model.engine"
WEIGHTS_FILE = "weights.bin"  # a weightless engine's inline weights (small graphs keep them in model.onnx)
TIMING_CACHE = "timing.cache"
# TensorRT-RTX ahead-of-time targets (compute capability -> enum name); FP8 needs Ada (8.9) or newer.
log = logging.getLogger(__name__)
WEIGHT_MODES = ("embedded", "inputs")
WEIGHT_INPUT_MIN = 4096  # initializers with fewer elements (norm weights, rotary tables) stay constants
RTX_TARGETS = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}
FP8_MIN_CC = 8.9


class EngineError(RuntimeError):
    """An engine that cannot be built or used here; the message says what to run instead."""


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible (driver loaded), without importing CUDA libraries."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def installed(backend: str) -> bool:
    return backend == "onnxruntime" or importlib.util.find_spec(MODULES[backend]) is not None


def choose_backend(requested: str | None) -> tuple[str, str]:
    """The backend to build for and why: TensorRT with a GPU, else TensorRT-RTX when installed, else ORT."""
    if requested is not None:
        if requested not in BACKENDS:
            raise EngineError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)}")
        if not installed(requested):
            hint = {"tensorrt": "install TensorRT for your GPU (pip install tensorrt, on the GPU host)",
                    "tensorrt-rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"}[requested]
            raise EngineError(f"backend {requested} is not installed: {hint}, or use --backend onnxruntime")
        return requested, "requested with --backend"
    if installed("tensorrt") and gpu_present():
        return "tensorrt", "TensorRT and an NVIDIA GPU are present"
    if installed("tensorrt-rtx"):
        why = "no GPU" if not gpu_present() else "data-centre TensorRT is not installed"
        return "tensorrt-rtx", f"TensorRT for RTX is installed ({why}: ahead-of-time build)"
    return "onnxruntime", "no TensorRT installed: the ONNX graph runs in ONNX Runtime"


def import_trt(backend: str) -> ModuleType:
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as e:
        raise EngineError(f"cannot import {MODULES[backend]} for backend {backend}: {e}") from e


# Messages TensorRT prints that are expected here and say nothing to the user: the int64 inputs are bound as
# int64 by our runtime, and without a GPU the validity check cannot read GPU properties (we report that).
_EXPECTED = ("has Int64 binding", "Error reading CUDA GPU properties")
_LOGGERS: dict[str, Any] = {}


def trt_logger(trt: ModuleType) -> Any:
    """One logger per TensorRT module (TensorRT keeps the first it sees), routed to Python logging."""
    key = trt.__name__
    if key not in _LOGGERS:
        levels = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
                  trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG,
                  trt.ILogger.VERBOSE: logging.DEBUG}

        class Logger(trt.ILogger):  # type: ignore[misc,name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                level = logging.DEBUG if any(e in msg for e in _EXPECTED) else levels.get(severity, logging.INFO)
                log.log(level, "%s: %s", key, msg)

        _LOGGERS[key] = Logger()
    return _LOGGERS[key]


@dataclass(frozen=True)
class EngineSpec:
    backend: str
    max_batch: int = 1
    max_context: int = 4096
    max_prefill: int = 512
    targets: tuple[str, ...] = ()  # compute capabilities ("8.9", ...); empty = flavour default
    weights: str = "embedded"  # or "inputs": a weightless plan, the runtime binds the weights (module doc)

    def check(self, precision: str, model_max: int) -> None:
        problems = []
        if self.weights not in WEIGHT_MODES:
            problems.append(f"--engine-weights must be one of {', '.join(WEIGHT_MODES)} (got {self.weights!r})")
        if self.max_batch < 1:
            problems.append(f"--max-batch must be >= 1 (got {self.max_batch})")
        if not 2 <= self.max_context <= model_max:
            problems.append(f"--max-context must be between 2 and the model's {model_max} (got {self.max_context})")
        if not 1 <= self.max_prefill <= self.max_context:
            problems.append(f"--max-prefill must be between 1 and --max-context (got {self.max_prefill})")
        unknown = [t for t in self.targets if t not in RTX_TARGETS]
        if unknown and self.backend == "tensorrt-rtx":
            problems.append(f"unknown --target {unknown}: TensorRT-RTX targets {', '.join(RTX_TARGETS)}")
        if precision == "fp32":
            problems.append("TensorRT has no fused fp32 attention: build the engine with --precision fp16 or bf16 "
                            "(or use --backend onnxruntime for fp32)")
        if precision == "fp8":
            low = [t for t in self.targets if float(t) < FP8_MIN_CC]
            if low:
                problems.append(f"FP8 needs compute capability >= {FP8_MIN_CC} (Ada, Hopper, Blackwell); "
                                f"--target {', '.join(low)} cannot run it: use --precision int8 or fp16")
        if problems:
            raise EngineError("; ".join(problems))


class _Progress:
    """Adapter from TensorRT's IProgressMonitor to a rich progress display (one bar per build phase)."""

    def __init__(self, trt: ModuleType, progress: Any) -> None:
        outer = self

        class Monitor(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                outer.tasks[phase_name] = progress.add_task(f"  {phase_name}", total=max(num_steps, 1))

            def step_complete(self, phase_name: str, step: int) -> bool:
                if phase_name in outer.tasks:
                    progress.update(outer.tasks[phase_name], completed=step + 1)
                return True  # keep building

            def phase_finish(self, phase_name: str) -> None:
                if phase_name in outer.tasks:
                    progress.remove_task(outer.tasks.pop(phase_name))

        self.tasks: dict[str, Any] = {}
        self.monitor = Monitor()


def _pinned_graph(onnx_path: Path, max_context: int, weights_as_inputs: bool = False,
                  side_file: tuple[Path, str] | None = None) -> tuple[bytes, list[dict[str, Any]]]:
    """The graph with ``cache_len`` fixed to ``max_context`` (weights stay external, read by the parser), and with
    ``weights_as_inputs`` every initializer of >= ``WEIGHT_INPUT_MIN`` elements turned into a graph input; returns
    the graph and the table of those inputs (name, ONNX dtype, shape, data file, offset, length).

    External initializers are listed where they are (``model.onnx.data``); inline ones (graphs under 2 GB keep
    their weights inside ``model.onnx``, at no stable offset) are written to ``side_file`` = (path to write, its
    name relative to the artifact), 64-byte aligned."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_", "present_")):
            dim = value.type.tensor_type.shape.dim[2]
            dim.ClearField("dim_param")
            dim.dim_value = max_context
    table: list[dict[str, Any]] = []
    if not weights_as_inputs:
        return model.SerializeToString(), table
    keep = []
    side = None
    try:
        for init in model.graph.initializer:
            elements = 1
            for d in init.dims:
                elements *= d
            external = init.data_location == onnx.TensorProto.EXTERNAL
            if elements < WEIGHT_INPUT_MIN or not (external or init.raw_data) or (not external and side_file is None):
                keep.append(init)  # small, or typed fields without raw bytes (never written by our exporter)
                continue
            record = {"name": init.name, "dtype": onnx.TensorProto.DataType.Name(init.data_type),
                      "shape": [int(d) for d in init.dims]}
            if external:
                info = {e.key: e.value for e in init.external_data}
                record.update(file=info["location"], offset=int(info.get("offset", 0)), length=int(info["length"]))
            else:
                assert side_file is not None
                if side is None:
                    side = open(side_file[0], "wb")  # closed below, also on error
                side.write(b"\0" * (-side.tell() % 64))
                record.update(file=side_file[1], offset=side.tell(), length=len(init.raw_data))
                side.write(init.raw_data)
            table.append(record)
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    finally:
        if side is not None:
            side.flush()
            os.fsync(side.fileno())
            side.close()
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model.SerializeToString(), table


def _parse(parser: Any, graph: bytes, onnx_path: Path) -> list[Any] | None:
    """Parse ``graph`` with its external weights handed to the parser as pointers into memory maps of the data
    files (``load_initializer``), so the parser copies nothing and the pages are read as the builder needs them;
    returns the maps (to keep alive until the engine is built), None when parsing failed. Parsers without that
    API read the files themselves. Measured (TensorRT-RTX 1.7, docs/memory.md): with the plan streamed to a file
    too, a build's peak RSS drops from 6.0x to 3.9x the fp16 weights."""
    import numpy as np

    if not hasattr(parser, "load_model_proto"):
        return [] if parser.parse(graph, str(onnx_path)) else None
    if not parser.load_model_proto(graph, str(onnx_path)):
        return None
    maps: dict[str, Any] = {}
    for init in onnx.ModelProto.FromString(graph).graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        location = info["location"]
        if location not in maps:
            maps[location] = np.memmap(onnx_path.parent / location, dtype=np.uint8, mode="r")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        if not parser.load_initializer(init.name, maps[location].ctypes.data + offset, length):
            return None
    return list(maps.values()) if parser.parse_model_proto() else None


def _build_to_file(trt: ModuleType, builder: Any, network: Any, config: Any, path: Path) -> bool:
    """Serialize the engine straight into ``path`` (``build_serialized_network_to_stream``): no host-memory copy of
    the whole plan beside the builder's own (the plan is at least as large as the weights)."""
    if not hasattr(builder, "build_serialized_network_to_stream"):
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            return False
        path.write_bytes(serialized)
        return True

    class Writer(trt.IStreamWriter):  # type: ignore[misc,name-defined]
        def __init__(self, f: Any) -> None:
            trt.IStreamWriter.__init__(self)
            self.f = f

        def write(self, data: Any) -> int:
            chunk = bytes(data)
            self.f.write(chunk)
            return len(chunk)

    with open(path, "wb") as f:
        ok = bool(builder.build_serialized_network_to_stream(network, config, Writer(f)))
        f.flush()
        os.fsync(f.fileno())
    return ok and path.stat().st_size > 0


def build_engine(artifact: Path, spec: EngineSpec, precision: str, model_max: int) -> dict[str, Any]:
    """Build ``artifact/engine/<backend>/model.engine`` (atomically: in a staging directory, removed on failure,
    renamed over the old engine when complete); return its manifest entry."""
    spec.check(precision, model_max)
    trt = import_trt(spec.backend)
    out_dir = Path(artifact) / "engine" / spec.backend
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        entry = _build_into(trt, Path(artifact), staging, out_dir, spec, precision)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    entry["bytes"] = (out_dir / ENGINE_FILE).stat().st_size
    entry["build_s"] = round(time.perf_counter() - t0, 2)
    return entry


def _build_into(trt: ModuleType, artifact: Path, staging: Path, out_dir: Path, spec: EngineSpec,
                precision: str) -> dict[str, Any]:
    """Parse, configure and build into ``staging``; the entry's paths name the engine's final place."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Precision comes from the graph's dtypes and Q/DQ nodes, never from builder heuristics.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = artifact / "model.onnx"
    side_file = (staging / WEIGHTS_FILE, str((out_dir / WEIGHTS_FILE).relative_to(artifact)))
    graph, weight_inputs = _pinned_graph(onnx_path, spec.max_context, spec.weights == "inputs", side_file)
    mapped = _parse(parser, graph, onnx_path)  # kept mapped until built
    del graph
    if mapped is None:
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{spec.backend} could not parse {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    profiles = []
    for name, max_seq, opt_seq in (("decode", 1, 1), ("prefill", spec.max_prefill, min(spec.max_prefill, 128))):
        profile, shapes = _profile(builder, network, spec, max_seq, opt_seq)
        config.add_optimization_profile(profile)
        profiles.append({"name": name, "shapes": shapes})
    if spec.backend == "tensorrt-rtx":
        targets = spec.targets or (("8.9", "12.0") if precision == "fp8" else ("8.6", "8.9", "12.0"))
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_TARGETS[t]), i)
    else:
        targets = spec.targets or ("current GPU",)
    # A persisted timing cache speeds up rebuilds with data-centre TensorRT; TensorRT-RTX has none (its
    # timing-cache calls are deprecated no-ops since 1.2), so none is written for it.
    cache_path = artifact / "engine" / TIMING_CACHE
    use_cache = spec.backend == "tensorrt"
    if use_cache:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    with count_progress() as progress:
        monitor = _Progress(trt, progress)
        config.progress_monitor = monitor.monitor
        weights = (f"weights as {len(weight_inputs)} inputs, bound at run time" if spec.weights == "inputs"
                   else "weights embedded")
        console.print(f"building {spec.backend} engine ({precision}, batch <= {spec.max_batch}, "
                      f"context {spec.max_context}, targets {', '.join(targets)}, {weights})")
        built = _build_to_file(trt, builder, network, config, staging / ENGINE_FILE)
    del mapped
    if not built:
        raise EngineError(f"{spec.backend} failed to build the engine (see the TensorRT messages above)")
    if use_cache:
        atomic.write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return {
        "backend": spec.backend,
        "flavour": "TensorRT for RTX" if spec.backend == "tensorrt-rtx" else "TensorRT",
        "version": trt.__version__,
        "file": str((out_dir / ENGINE_FILE).relative_to(artifact)),
        "precision": precision,
        "targets": list(targets),
        "spec": asdict(spec),
        "profiles": profiles,
        "weights": {"mode": spec.weights, "tensors": weight_inputs,
                    "bytes": sum(w["length"] for w in weight_inputs)},
    }


def _profile(builder: Any, network: Any, spec: EngineSpec, max_seq: int, opt_seq: int) -> tuple[Any, dict[str, Any]]:
    b, c = spec.max_batch, spec.max_context
    profile = builder.create_optimization_profile()
    shapes: dict[str, Any] = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if -1 not in tuple(t.shape):  # a weight input (weights="inputs"): static, needs no profile
            continue
        if t.name in ("input_ids", "position_ids"):
            dims = [(1, 1), (1, opt_seq), (b, max_seq)]
        elif t.name == "logits_index":
            dims = [(1, 1), (1, 1), (b, max_seq)]
        else:  # cache buffers: [batch, kv_heads, max_context, head_dim]
            _, g, _, d = tuple(t.shape)
            dims = [(1, g, c, d), (1, g, c, d), (b, g, c, d)]
        profile.set_shape(t.name, *dims)
        if not t.name.startswith("past_"):
            shapes[t.name] = [list(x) for x in dims]
    return profile, shapes


def choose_weights(weight_bytes: int, quantized: bool, flag: str) -> str:
    """``auto`` engine weights (``glm-export build --engine-weights``, ``glm-export engine --weights``): embedded
    when the build over ``weight_bytes`` of graph weights fits in 80 % of the available RAM, else inputs, said."""
    from glm_export import budget
    from glm_runtime.engine import available_memory_bytes

    need, _ = budget.engine_step(weight_bytes, quantized, "embedded")
    available = available_memory_bytes()
    if need <= 0.8 * available:
        return "embedded"
    console.print(f"engine weights: network inputs, bound by the runtime (an engine with them embedded needs about "
                  f"{budget.gib(need)} of RAM to build, {budget.gib(available)} is available; {flag} embedded "
                  "forces it)")
    return "inputs"


def check_engine(artifact: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Ask the engine's own runtime whether the file is a valid engine (header / validity API).

    Without a GPU the check can only rule out a malformed or version-mismatched file; it says so.
    """
    trt = import_trt(entry["backend"])
    runtime = trt.Runtime(trt_logger(trt))
    data = (Path(artifact) / entry["file"]).read_bytes()
    if not hasattr(runtime, "get_engine_validity"):
        return {"checked": False, "reason": f"{entry['backend']} {trt.__version__} has no validity API"}
    validity, diagnostics = runtime.get_engine_validity(data)
    d = trt.EngineInvalidityDiagnostics
    flags = {n: bool(diagnostics & int(getattr(d, n))) for n in
             ("VERSION_MISMATCH", "UNSUPPORTED_CC", "OLD_CUDA_DRIVER", "OLD_CUDA_RUNTIME",
              "INSUFFICIENT_GPU_MEMORY", "MALFORMED_ENGINE", "CUDA_ERROR")}
    return {"checked": True, "validity": validity.name, "diagnostics": [n for n, on in flags.items() if on],
            "well_formed": not (flags["MALFORMED_ENGINE"] or flags["VERSION_MISMATCH"]),
            "gpu_checked": gpu_present()}


def update_manifest_engines(artifact: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Record ``entry`` in the manifest (replacing any engine of the same backend) and re-hash the files."""
    from glm_export.export import write_manifest

    manifest = mf.read_manifest(artifact, verify="none")
    engines = [e for e in manifest.get("engines", []) if e["backend"] != entry["backend"]]
    manifest["engines"] = [*engines, entry]
    write_manifest(Path(artifact), manifest)
    return manifest


def describe(entry: dict[str, Any]) -> str:
    brief = {k: entry[k] for k in ("backend", "version", "precision", "targets", "bytes", "build_s")}
    brief["weights"] = entry.get("weights", {}).get("mode", "embedded")
    return json.dumps(brief)
