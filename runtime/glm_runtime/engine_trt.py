"""The TensorRT engine behind the same :class:`~glm_runtime.engine.Engine` interface as ONNX Runtime's.

Runs ``engine/<backend>/model.engine`` of an artifact with ``tensorrt`` or TensorRT for RTX, using
cuda-python for device buffers and the stream. Needs an NVIDIA GPU: on a machine without one, loading fails
with a message that says so (and the tests that need it skip with that reason).

- The cache length is the engine's (pinned to ``--max-context`` at build; TensorRT's KV-cache update needs it
  static), so ``allocate`` always gives ``max_context`` slots and ``resize`` only checks the request fits.
- The KV update is in place: every ``past_*`` input and its ``present_*`` output are bound to the *same*
  device buffer, which is what TensorRT's KV-cache-update layer requires.
- Two execution contexts, one per optimization profile (0 = decode, 1 = prefill), share those buffers.
- Decode steps are captured once per batch size into a CUDA graph and replayed (no per-token launch
  overhead of the individual kernels); a step whose shapes differ from the captured ones runs directly.
- Weightless engines (``glm-export engine --weights inputs``): the plan has the weights as network inputs; they
  are uploaded once from the artifact (``model.onnx.data``, or ``engine/<backend>/weights.bin`` for a small graph:
  the byte ranges the manifest entry lists, checked against the files before any is read) and their device
  addresses bound to both contexts.
- Row views (continuous batching, :class:`glm_runtime.engine.RowEngine`): rows ``[start, stop)`` of a cache
  are the same device buffers at a pointer offset of ``start`` rows (the row is the outermost dimension);
  views are kept per cache, so each one's captured decode graph stays valid.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from glm_runtime.config import ModelConfig
from glm_runtime.manifest import confined

FP8_MIN_CC = (8, 9)
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}


class TensorRTError(RuntimeError):
    """The TensorRT engine cannot run here; the message says what to do instead."""


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as e:
            raise TensorRTError("the TensorRT engine needs cuda-python: pip install 'glm-runtime[gpu]'") from e
    return cudart


def _ok(result: Any) -> Any:
    """cuda-python returns ``(error, *values)``: raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TensorRTError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


def device_capability(cudart: Any) -> tuple[int, int]:
    count = _ok(cudart.cudaGetDeviceCount())
    if count < 1:
        raise TensorRTError("no CUDA GPU found: run this artifact with --backend onnxruntime (CPU)")
    props = _ok(cudart.cudaGetDeviceProperties(0))
    return int(props.major), int(props.minor)


def check_compatibility(entry: dict[str, Any], capability: tuple[int, int], trt_version: str) -> None:
    """Refuse an engine this GPU or TensorRT install cannot run, saying what to run instead."""
    cc = f"{capability[0]}.{capability[1]}"
    rebuild = f"rebuild it here: glm-export engine ARTIFACT --backend {entry['backend']}"
    if entry["precision"] == "fp8" and capability < FP8_MIN_CC:
        raise TensorRTError(f"FP8 needs compute capability >= 8.9; this GPU is {cc}: "
                            f"build the artifact with --precision int8 or fp16")
    if entry["version"] != trt_version:
        raise TensorRTError(f"the engine was built with {entry['flavour']} {entry['version']}, this host has "
                            f"{trt_version}: {rebuild}, or install {entry['version']}")
    targets = entry.get("targets", [])
    if entry["backend"] == "tensorrt-rtx" and targets and cc not in targets:
        raise TensorRTError(f"the engine targets compute capabilities {', '.join(targets)}, this GPU is {cc}: "
                            f"{rebuild} --target {cc}")


# Bits per element of the ONNX types a weight input can have (int4 packs two per byte).
WEIGHT_BITS = {"FLOAT": 32, "FLOAT16": 16, "BFLOAT16": 16, "INT8": 8, "UINT8": 8, "FLOAT8E4M3FN": 8, "INT4": 4,
               "UINT4": 4, "INT32": 32, "INT64": 64}


def weight_inputs(artifact: Path, entry: dict[str, Any]) -> list[tuple[str, Path, int, int]]:
    """The weight inputs of a weightless engine as ``(name, file, offset, length)``, each checked against the
    artifact (the manifest is untrusted input): names unique, files inside the artifact, byte ranges inside the
    files and as long as the shape and type say. Empty for an engine with its weights embedded."""
    weights = entry.get("weights") or {"mode": "embedded"}
    mode = weights.get("mode") if isinstance(weights, dict) else None
    if mode == "embedded":
        return []
    if mode != "inputs" or not isinstance(weights.get("tensors"), list):
        raise TensorRTError(f"the engine entry's 'weights' is malformed ({str(weights)[:80]}): rebuild the engine "
                            f"with glm-export engine ARTIFACT --backend {entry.get('backend')}")
    out, seen, sizes = [], set(), {}
    for t in weights["tensors"]:
        name = t.get("name") if isinstance(t, dict) else None
        try:
            bits = WEIGHT_BITS[t["dtype"]]
            shape = [int(d) for d in t["shape"]]
            offset, length, file = int(t["offset"]), int(t["length"]), t["file"]
        except (KeyError, TypeError, ValueError):
            raise TensorRTError(f"weight input {str(t)[:80]} is malformed (name, dtype, shape, file, offset, "
                                "length): rebuild the engine") from None
        elements = int(np.prod(shape, dtype=np.int64))
        problem = None
        if not isinstance(name, str) or name in seen:
            problem = "has no name or a repeated one"
        elif not confined(file):
            problem = f"names the file {file!r}, outside the artifact"
        elif min(shape, default=0) < 0 or length != (elements * bits + 7) // 8 or offset < 0:
            problem = f"is {length} bytes at offset {offset}; its shape {shape} and type {t['dtype']} say otherwise"
        else:
            if file not in sizes:
                path = Path(artifact) / file
                sizes[file] = path.stat().st_size if path.is_file() else -1
            if sizes[file] < 0:
                problem = f"is in {file}, which the artifact does not have"
            elif offset + length > sizes[file]:
                problem = f"ends at byte {offset + length}, past the end of {file} ({sizes[file]} bytes)"
        if problem:
            raise TensorRTError(f"weight input {name!r} {problem}: the artifact is damaged, copy or rebuild it")
        seen.add(name)
        out.append((name, Path(artifact) / file, offset, length))
    return out


class TrtKVCache:
    """Device K/V buffers ``[batch, kv_heads, max_context, head_dim]``, K and V per layer."""

    def __init__(self, engine: TrtEngine, batch: int, pointers: list[int] | None = None) -> None:
        self.engine, self.batch, self.cache_len = engine, batch, engine.max_context
        cfg = engine.config
        self.buffer_bytes = batch * cfg.num_kv_heads * self.cache_len * cfg.head_dim * engine.cache_itemsize
        self.is_view = pointers is not None
        self.pointers = pointers if pointers is not None else [
            engine.malloc(self.buffer_bytes, zero=True) for _ in range(2 * cfg.num_layers)]
        self.views: dict[tuple[int, int], TrtKVCache] = {}

    @property
    def nbytes(self) -> int:
        return self.buffer_bytes * len(self.pointers)

    def addresses(self) -> list[int]:
        return list(self.pointers)

    def free(self) -> None:
        if not self.is_view:  # a view's memory belongs to its cache
            for p in self.pointers:
                self.engine.cudart.cudaFree(p)
        self.pointers = []
        self.views.clear()


def copy_device_rows(base: int, heads: int, cache_len: int, slot_bytes: int, src: int, dst: int, length: int,
                     stream: Any = 0) -> None:
    """Copy slots ``[0, length)`` of row ``src`` to row ``dst`` of one device buffer ``[rows, heads, cache_len,
    slot]``: per head one contiguous run of ``length x slot_bytes``, heads ``cache_len x slot_bytes`` apart, so
    one strided 2-D device-to-device copy (no host round trip)."""
    cudart = _cudart()
    pitch = cache_len * slot_bytes
    row = heads * pitch
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    _ok(cudart.cudaMemcpy2DAsync(base + dst * row, pitch, base + src * row, pitch, length * slot_bytes, heads,
                                 kind, stream))
    _ok(cudart.cudaStreamSynchronize(stream))


def copy_slots_to_host(base: int, heads: int, cache_len: int, row: int, start: int, out: np.ndarray,
                       stream: Any = 0) -> None:
    """Slots ``[start, start + n)`` of ``row`` of one device buffer ``[rows, heads, cache_len, slot]`` into the
    host array ``out [heads, n, slot_bytes]`` (uint8): one strided 2-D copy (prefix caching)."""
    cudart = _cudart()
    heads_, n, slot_bytes = out.shape
    assert heads_ == heads and out.flags.c_contiguous
    pitch = cache_len * slot_bytes
    src = base + row * heads * pitch + start * slot_bytes
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _ok(cudart.cudaMemcpy2DAsync(out.ctypes.data, n * slot_bytes, src, pitch, n * slot_bytes, heads, kind, stream))
    _ok(cudart.cudaStreamSynchronize(stream))


def copy_slots_from_host(base: int, heads: int, cache_len: int, row: int, start: int, data: np.ndarray,
                         stream: Any = 0) -> None:
    """The inverse of :func:`copy_slots_to_host`: ``data [heads, n, slot_bytes]`` into slots ``[start, start +
    n)`` of ``row``."""
    cudart = _cudart()
    data = np.ascontiguousarray(data)
    heads_, n, slot_bytes = data.shape
    assert heads_ == heads
    pitch = cache_len * slot_bytes
    dst = base + row * heads * pitch + start * slot_bytes
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    _ok(cudart.cudaMemcpy2DAsync(dst, pitch, data.ctypes.data, n * slot_bytes, n * slot_bytes, heads, kind, stream))
    _ok(cudart.cudaStreamSynchronize(stream))


class TrtEngine:
    """One TensorRT engine on GPU 0, driven through the graph interface of ``docs/graph.md``."""

    def __init__(self, artifact: Path, entry: dict[str, Any], config: ModelConfig) -> None:
        self.cudart = cudart = _cudart()
        trt = importlib.import_module(MODULES[entry["backend"]])
        check_compatibility(entry, device_capability(cudart), trt.__version__)
        self.config, self.entry = config, entry
        self.max_batch = int(entry["spec"]["max_batch"])
        self.max_context = int(entry["spec"]["max_context"])
        self.max_prefill = int(entry["spec"]["max_prefill"])
        self.cache_dtype = "bfloat16" if entry["precision"] == "bf16" else "float16"
        self.cache_itemsize = 2
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = (Path(artifact) / entry["file"]).read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise TensorRTError(f"{entry['flavour']} could not deserialize {entry['file']}: rebuild it with "
                                f"glm-export engine ARTIFACT --backend {entry['backend']}")
        self.stream = _ok(cudart.cudaStreamCreate())
        self._weights = self._upload_weights(weight_inputs(Path(artifact), entry))
        self._contexts = []
        for profile in (0, 1):  # decode, prefill
            ctx = self._engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self.stream)
            for name, ptr in self._weights.items():
                ctx.set_tensor_address(name, ptr)
            self._contexts.append(ctx)
        b, p, v = self.max_batch, self.max_prefill, config.vocab_size
        self._ids = self.malloc(b * p * 8)
        self._pos = self.malloc(b * p * 8)
        self._idx = self.malloc(b * 8)
        self._logits = self.malloc(b * v * 4)
        self._host_logits = np.empty((b, v), dtype=np.float32)
        self._graphs: dict[tuple[int, int], Any] = {}
        self._bound: tuple[int, int] | None = None
        self._run_s = 0.0

    # ---- memory -----------------------------------------------------------------------------------------
    def _upload_weights(self, table: list[tuple[str, Path, int, int]]) -> dict[str, int]:
        """Copy each weight input's bytes from the memory-mapped data file to its own device buffer, once."""
        self.weight_bytes = 0
        if not table:
            return {}
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        missing = [name for name, *_ in table if name not in names]
        if missing:
            raise TensorRTError(f"the engine has no input {missing[0]!r} that its manifest entry lists "
                                f"({len(missing)} such): rebuild it with glm-export engine ARTIFACT --weights inputs")
        maps: dict[Path, np.memmap] = {}
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        pointers: dict[str, int] = {}
        try:
            for name, path, offset, length in table:
                if path not in maps:
                    maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
                ptr = pointers[name] = self.malloc(length)
                _ok(self.cudart.cudaMemcpy(ptr, maps[path].ctypes.data + offset, length, h2d))
        except BaseException:
            for ptr in pointers.values():
                self.cudart.cudaFree(ptr)
            raise
        self.weight_bytes = sum(length for *_, length in table)
        return pointers

    def malloc(self, nbytes: int, zero: bool = False) -> int:
        ptr = int(_ok(self.cudart.cudaMalloc(nbytes)))
        if zero:
            _ok(self.cudart.cudaMemset(ptr, 0, nbytes))
        return ptr

    def allocate(self, batch: int, cache_len: int) -> TrtKVCache:
        self._check_size(batch, cache_len)
        return TrtKVCache(self, batch)

    def resize(self, cache: TrtKVCache, cache_len: int, keep: int) -> None:
        self._check_size(cache.batch, cache_len)  # the buffers already hold max_context slots

    def rows(self, cache: TrtKVCache, start: int, stop: int) -> TrtKVCache:
        """Rows ``[start, stop)`` of ``cache``: the same buffers at an offset of ``start`` rows."""
        if cache.is_view:
            raise ValueError("take row views of the pool, not of a view")
        if not 0 <= start < stop <= cache.batch:
            raise ValueError(f"rows [{start}, {stop}) are outside the cache's {cache.batch} rows")
        view = cache.views.get((start, stop))
        if view is None:
            row_bytes = cache.buffer_bytes // cache.batch
            view = TrtKVCache(self, stop - start, [p + start * row_bytes for p in cache.pointers])
            cache.views[(start, stop)] = view
        return view

    def copy_rows(self, cache: TrtKVCache, src: int, dst: int, length: int) -> None:
        if src == dst or length <= 0:
            return
        cfg = self.config
        for ptr in cache.pointers:
            copy_device_rows(ptr, cfg.num_kv_heads, cache.cache_len, cfg.head_dim * self.cache_itemsize, src, dst,
                             length, self.stream)

    def read_slots(self, cache: TrtKVCache, row: int, start: int, stop: int) -> np.ndarray:
        """Slots ``[start, stop)`` of ``row``, every buffer, as raw bytes ``[2 x layers, kv_heads, n, slot]``."""
        cfg = self.config
        out = np.empty((len(cache.pointers), cfg.num_kv_heads, stop - start, cfg.head_dim * self.cache_itemsize),
                       np.uint8)
        for i, ptr in enumerate(cache.pointers):
            copy_slots_to_host(ptr, cfg.num_kv_heads, cache.cache_len, row, start, out[i], self.stream)
        return out

    def write_slots(self, cache: TrtKVCache, row: int, start: int, data: np.ndarray) -> None:
        for ptr, block in zip(cache.pointers, data, strict=True):
            copy_slots_from_host(ptr, self.config.num_kv_heads, cache.cache_len, row, start, block, self.stream)

    def _check_size(self, batch: int, cache_len: int) -> None:
        if batch > self.max_batch or cache_len > self.max_context:
            raise TensorRTError(
                f"batch {batch} x context {cache_len} exceeds the engine's --max-batch {self.max_batch} / "
                f"--max-context {self.max_context}: rebuild with glm-export engine ARTIFACT "
                f"--max-batch {max(batch, self.max_batch)} --max-context {max(cache_len, self.max_context)}"
            )

    # ---- running ----------------------------------------------------------------------------------------
    @property
    def run_seconds(self) -> float:
        return self._run_s

    def describe(self) -> str:
        return (f"{self.entry['flavour']} {self.entry['version']} ({self.entry['precision']}, batch <= "
                f"{self.max_batch}, context {self.max_context})")

    def _bind(self, ctx: Any, cache: TrtKVCache, batch: int, seq: int, k: int) -> None:
        cfg = self.config
        shapes = {"input_ids": (batch, seq), "position_ids": (batch, seq), "logits_index": (batch, k)}
        addresses = {"input_ids": self._ids, "position_ids": self._pos, "logits_index": self._idx,
                     "logits": self._logits}
        for name, shape in shapes.items():
            ctx.set_input_shape(name, shape)
        for i in range(cfg.num_layers):
            for j, kv in enumerate(("key", "value")):
                ptr = cache.pointers[2 * i + j]
                shape = (batch, cfg.num_kv_heads, self.max_context, cfg.head_dim)
                ctx.set_input_shape(f"past_{kv}_{i}", shape)
                addresses[f"past_{kv}_{i}"] = addresses[f"present_{kv}_{i}"] = ptr  # in place
        for name, ptr in addresses.items():
            ctx.set_tensor_address(name, ptr)

    def step(self, cache: TrtKVCache, input_ids: np.ndarray, position_ids: np.ndarray,
             logits_index: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        batch, seq = input_ids.shape
        if seq > self.max_prefill:
            raise TensorRTError(f"a step of {seq} tokens exceeds the engine's prefill profile ({self.max_prefill}); "
                                f"prefill in chunks of at most {self.max_prefill}")
        t0 = time.perf_counter()
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for dst, arr in ((self._ids, input_ids), (self._pos, position_ids), (self._idx, logits_index)):
            a = np.ascontiguousarray(arr, dtype=np.int64)
            _ok(cudart.cudaMemcpyAsync(dst, a.ctypes.data, a.nbytes, h2d, self.stream))
        decode = seq == 1
        ctx = self._contexts[0 if decode else 1]
        key = (batch, id(cache))
        if decode and key in self._graphs:
            _ok(cudart.cudaGraphLaunch(self._graphs[key], self.stream))
        else:
            self._bind(ctx, cache, batch, seq, logits_index.shape[1])
            if decode:
                self._graphs[key] = self._capture(ctx)
                _ok(cudart.cudaGraphLaunch(self._graphs[key], self.stream))
            elif not ctx.execute_async_v3(self.stream):
                raise TensorRTError("TensorRT execution failed (see the TensorRT messages above)")
        out = self._host_logits[:batch]
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ok(cudart.cudaMemcpyAsync(out.ctypes.data, self._logits, out.nbytes, d2h, self.stream))
        _ok(cudart.cudaStreamSynchronize(self.stream))
        self._run_s += time.perf_counter() - t0
        return out

    def _capture(self, ctx: Any) -> Any:
        """Capture one decode step into a CUDA graph (TensorRT needs one plain run before capturing)."""
        cudart = self.cudart
        if not ctx.execute_async_v3(self.stream):
            raise TensorRTError("TensorRT execution failed (see the TensorRT messages above)")
        _ok(cudart.cudaStreamSynchronize(self.stream))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        _ok(cudart.cudaStreamBeginCapture(self.stream, mode))
        ctx.execute_async_v3(self.stream)
        graph = _ok(cudart.cudaStreamEndCapture(self.stream))
        return _ok(cudart.cudaGraphInstantiate(graph, 0))

    def close(self) -> None:
        for ptr in (self._ids, self._pos, self._idx, self._logits, *self._weights.values()):
            self.cudart.cudaFree(ptr)
        self._weights = {}
        self._graphs.clear()
