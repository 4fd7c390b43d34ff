"""The ONNX Runtime engine: the artifact's ``model.onnx`` driven through IO binding.

Why IO binding: the graph's ``TensorScatter`` writes the step's K/V into the cache buffer, and ONNX Runtime
does that in place only when the *same* OrtValue is bound as ``past_*`` input and ``present_*`` output
(otherwise it copies the whole cache every step and logs "in-place optimization not activated"). Each
:class:`OrtKVCache` therefore owns its buffers, its logits buffer and its own binding; a step only rebinds
the small id/position inputs, and not even those when the caller passes the same arrays again.

Why buffers sized per request: ORT's CPU ``Attention`` computes over the whole cache length, valid or not, so
a buffer sized to the model's 128K context would make every step cost 128K positions. Caches are sized to
what a request needs (``engine.round_cache_len``) and grown by :meth:`OrtEngine.resize` when a conversation
outgrows them.

Row views (:meth:`OrtEngine.rows`, for continuous batching): rows ``[start, stop)`` of a cache are bound as
OrtValues over the same memory (a numpy slice on the CPU; a device pointer offset on CUDA), each view with its
own binding (its logits go to the first rows of the pool's logits buffer), so a decode step over the packed
active rows or a prefill into free rows writes the shared pool in place.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from glm_runtime import cpu_kernel
from glm_runtime.config import ModelConfig
from glm_runtime.engine import format_bytes
from glm_runtime.manifest import ArtifactError

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# int8: a cache quantized with static scales (glm-export build --kv-cache-dtype int8); the graph dequantizes it.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int8)": "int8"}
_ONNX_ELEMENT_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int8": 3}  # onnx.TensorProto, for bind_input


def gpu_present() -> bool:
    """An NVIDIA GPU this process could use (driver device node or nvidia-smi on the PATH)."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def default_providers() -> list[str]:
    """TensorRT and CUDA first when onnxruntime-gpu and a GPU are both present; always CPU as the fallback."""
    available = ort.get_available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available] if gpu_present() else []
    return [*gpu, "CPUExecutionProvider"]


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:  # numpy has no bfloat16; ml_dtypes is the standard add-on
            raise ArtifactError("this artifact's KV cache is bfloat16: `pip install ml_dtypes` to run it") from e
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def ort_load_advice(message: str) -> str:
    """What to do about an ONNX Runtime load failure: a version problem only when the message says so (every
    failure used to advise an upgrade, even for a corrupt file: issue 19)."""
    version_signs = ("opset", "not_implemented", "could not find an implementation", "is not a registered",
                     "unsupported model ir version", "ir_version")
    if any(sign in message.lower() for sign in version_signs):
        return ("The graph needs opset 24 (onnxruntime >= 1.22); upgrade onnxruntime or rebuild the artifact with "
                "this version")
    return ("The file looks damaged or is not this artifact's graph: check the artifact (--verify hash) and copy "
            "or rebuild it")


class OrtKVCache:
    """K/V buffers of one batch of sequence slots, plus the logits buffer and the IO binding that use them."""

    def __init__(self, engine: OrtEngine, batch: int, logits: np.ndarray | None = None) -> None:
        self.batch = batch
        self.cache_len = 0
        self.itemsize = engine.itemsize
        self.binding = engine.session.io_binding()
        self.values: list[ort.OrtValue] = []
        self.arrays: list[np.ndarray] = []  # host arrays behind the OrtValues (CPU only)
        # A row view writes its logits into the first rows of its pool's buffer (one engine thread uses one view
        # at a time), so views cost no vocabulary-sized buffers of their own.
        self.logits = logits if logits is not None else np.empty((batch, 1, engine.config.vocab_size), np.float32)
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.bound: dict[str, np.ndarray] = {}
        self.views: dict[tuple[int, int], OrtKVCache] = {}  # row views of this cache (rebuilt after a resize)
        self.parent: OrtKVCache | None = None  # set on a view: the cache whose rows it shows

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) for v in self.values) * self.itemsize

    def addresses(self) -> list[int]:
        return [v.data_ptr() for v in self.values]


class OrtEngine:
    """:class:`glm_runtime.engine.Engine` on ONNX Runtime (CPU, CUDA or ORT's TensorRT provider)."""

    def __init__(self, model_path: Path, config: ModelConfig, providers: list[str] | None = None,
                 threads: int | None = None, log_severity: int = 2, int4_kernel: str | None = None,
                 attention_kernel: str = "auto", hugepages: bool = True) -> None:
        self.config = config
        self.model_path = Path(model_path)
        requested = providers or default_providers()
        unknown = [p for p in requested if p not in ort.get_available_providers()]
        if unknown:
            raise ValueError(f"execution providers {unknown} are not in this onnxruntime "
                             f"({ort.get_available_providers()}); GPU providers need `pip install onnxruntime-gpu`")
        size = sum(p.stat().st_size for p in self.model_path.parent.glob(self.model_path.name + "*"))
        log.info("loading %s (%s) with ONNX Runtime %s on %s, %s threads", self.model_path, format_bytes(size),
                 ort.__version__, requested, threads or "default")
        t0 = time.perf_counter()
        # int4_kernel: None = not an int4 graph; "auto" = the runtime's kernel when it is built and the session is
        # CPU-only; "ort" = ONNX Runtime's MatMulNBits (cpu_kernel.py says why there are two).
        # attention_kernel: "auto" = the runtime's Attention (csrc/attention.c) when the library is built, the
        # session is CPU-only and every Attention node has the form it implements; "ort" = ONNX Runtime's.
        cpu_only = requested == ["CPUExecutionProvider"]
        kernel = None
        if cpu_only and (int4_kernel == "auto" or attention_kernel == "auto"):
            kernel = cpu_kernel.load(threads)
        q4 = kernel is not None and int4_kernel == "auto"
        self.attention = cpu_kernel.ATTENTION_OFF
        if kernel is not None and attention_kernel == "auto":
            self.attention = cpu_kernel.attention_mode(kernel, q4)
            if not self.attention:
                log.info("ONNX Runtime's Attention: %s", cpu_kernel.attention_unavailable(kernel))
        if not q4 and not self.attention:
            kernel = None
        self.int4_kernel = "ONNX Runtime MatMulNBits" if int4_kernel else None
        self.hugepages = hugepages
        self.session, why = self._create_session(threads, log_severity, requested, kernel, q4)
        if kernel is not None and why is None:
            if q4:
                self.int4_kernel = kernel.describe()
        elif kernel is not None:
            log.warning("the runtime's CPU kernels cannot run this graph (%s): using ONNX Runtime's", why)
            attention_only = self.attention and "Attention" in str(why)
            self.attention = cpu_kernel.ATTENTION_OFF
            if self.session is None and attention_only and q4:  # keep the int4 kernel
                self.session, why = self._create_session(threads, log_severity, requested, kernel, q4)
                if self.session is not None and why is None:
                    self.int4_kernel = kernel.describe()
            if self.session is None:
                self.session, _ = self._create_session(threads, log_severity, requested, None, False)
        log.info("model loaded in %.1f s%s%s", time.perf_counter() - t0,
                 f"; int4 matmuls: {self.int4_kernel}" if self.int4_kernel else "",
                 f"; attention: {self.attention_kernel}")
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self._check_io()
        self._dtype = numpy_dtype(self.cache_dtype)
        self.itemsize = self._dtype.itemsize
        self._run_s = 0.0
        self._cache_names = [f"{kv}_{i}" for i in range(config.num_layers) for kv in ("key", "value")]
        q4_used = kernel is not None and self.int4_kernel == kernel.describe()
        if q4_used or (kernel is not None and self.attention):
            q4_ok, attention_ok = self._kernels_accept_inputs(kernel)
            if not attention_ok:
                log.warning("the runtime's attention refused this graph's Attention inputs (not the form glm-export "
                            "writes): using ONNX Runtime's")
                self.attention = cpu_kernel.ATTENTION_OFF
            if not q4_ok:  # a damaged artifact: ONNX Runtime alone, whose load check names the tensor
                log.warning("the runtime's int4 kernel refused this graph's int4 weights (shapes that do not match "
                            "their nodes): loading it on ONNX Runtime's kernel, which says what is wrong")
                self.int4_kernel = "ONNX Runtime MatMulNBits"
                self.attention = cpu_kernel.ATTENTION_OFF
                self.session, _ = self._create_session(threads, log_severity, requested, None, False)
            elif not attention_ok:
                self.session, _ = self._create_session(threads, log_severity, requested,
                                                       kernel if q4_used else None, q4_used)

    def _q4_kernel(self) -> cpu_kernel.Q4Kernel | None:
        """The runtime's int4 kernel when this session runs its MatMulNBits on it (the library is loaded then)."""
        return cpu_kernel.load(None) if self.int4_kernel and "glm-runtime" in self.int4_kernel else None

    def memory_reserved(self) -> int:
        """Bytes this engine is still about to allocate: the int4 weights queued for their huge-page copies (the
        file pages they replace count as available memory until then). The default KV budget leaves them."""
        kernel = self._q4_kernel()
        return kernel.hugepage_queued_bytes() if kernel is not None else 0

    def settle(self, timeout: float = 120.0) -> float:
        """Run one-token steps until the int4 kernel's weights are all on their huge-page copies (they are made in
        the background after loading; docs/runtime.md, "Huge pages"), so what is measured next is the steady state,
        as llama-bench's warm-up run does for llama.cpp. Returns the seconds waited; a no-op without the kernel."""
        kernel = self._q4_kernel()
        t0 = time.perf_counter()
        if kernel is None:
            return 0.0
        cache = self.allocate(1, 2)
        zero = np.zeros((1, 1), np.int64)
        while kernel.hugepage_pending() and time.perf_counter() - t0 < timeout:
            self.step(cache, zero, zero, zero)
            time.sleep(0.05)
        return time.perf_counter() - t0

    def _kernels_accept_inputs(self, kernel: cpu_kernel.Q4Kernel) -> tuple[bool, bool]:
        """One step on one token, in a two-slot buffer: the int4 kernel checks each node's weights against its
        attributes when it first runs it (ONNX Runtime's own kernel does so at load, and API version 8 shows a
        kernel no weights before), the attention each node's input shapes. Returns (int4 kernel accepted,
        attention accepted). A refused weight sends the artifact to ONNX Runtime's kernel, whose load error names
        the tensor. The step also pages the weights in, which the first request would otherwise wait for."""
        refused, attention_refused = kernel.bad_inputs(), kernel.attention_bad_inputs()
        cache = self.allocate(1, 2)
        for name in ("input_ids", "position_ids", "logits_index"):
            cache.binding.bind_cpu_input(name, np.zeros((1, 1), np.int64))
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refusal makes ORT log the next node's "Missing Input": expected here
        try:
            self.session.run_with_iobinding(cache.binding, quiet)
        except Exception:  # that same refusal, as ORT raises it
            pass
        return kernel.bad_inputs() == refused, kernel.attention_bad_inputs() == attention_refused

    @property
    def attention_kernel(self) -> str:
        if self.attention == cpu_kernel.ATTENTION_OFF:
            return "ONNX Runtime Attention"
        where = "its pool" if self.attention == cpu_kernel.ATTENTION_POOL else "the calling thread"
        return f"glm-runtime attention ({cpu_kernel.attention_isa()}, on {where})"

    def _create_session(self, threads: int | None, log_severity: int, providers: list[str],
                        kernel: cpu_kernel.Q4Kernel | None,
                        q4: bool) -> tuple[ort.InferenceSession | None, str | None]:
        """The session, and with ``kernel`` why it cannot be used (None: it is in use; no session: build one
        without it). The kernel stands in for MatMulNBits (``q4``) and Attention (``self.attention``) in this
        session only."""
        opts = ort.SessionOptions()
        opts.log_severity_level = log_severity
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        before, disabled, attention_before = 0, [], 0
        if kernel is not None:
            disabled = cpu_kernel.configure(opts, kernel, matmul=q4, attention=self.attention,
                                            hugepages=self.hugepages)
            before = kernel.unsupported()
            attention_before = kernel.attention_unsupported()
        try:
            session = ort.InferenceSession(str(self.model_path), opts, providers=providers,
                                           disabled_optimizers=disabled or None)
        except Exception as e:  # ORT raises its own pybind types (Fail, InvalidGraph, NotImplemented)
            if kernel is not None and ("MatMulNBits" in str(e) or "Attention" in str(e)):
                return None, str(e).splitlines()[0][:300]  # their schemas: 3 inputs (no zero points), float; 4 -> 1
            raise ArtifactError(f"ONNX Runtime {ort.__version__} cannot load {self.model_path}: {e}\n"
                                + ort_load_advice(str(e))) from e
        if kernel is None:
            return session, None
        if not kernel.lib.glm_q4_registered():
            return session, "it did not register: ONNX Runtime's C API is not the one it was written for"
        if kernel.unsupported() != before:
            return None, (f"{kernel.unsupported() - before} MatMulNBits nodes are not 4-bit with accuracy_level 4 "
                          "and a power-of-two block")
        if kernel.attention_unsupported() != attention_before:
            return None, f"{kernel.attention_unsupported() - attention_before} Attention nodes have other attributes"
        return session, None

    def _check_io(self) -> None:
        cfg = self.config
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        want_in = ["input_ids", "position_ids", "logits_index",
                   *[f"past_{kv}_{i}" for i in range(cfg.num_layers) for kv in ("key", "value")]]
        want_out = ["logits", *[f"present_{kv}_{i}" for i in range(cfg.num_layers) for kv in ("key", "value")]]
        problems = [f"missing input {n}" for n in want_in if n not in inputs]
        problems += [f"missing output {n}" for n in want_out if n not in outputs]
        if not problems:
            cache = inputs["past_key_0"]
            dims = cache.shape
            if len(dims) != 4 or dims[1] != cfg.num_kv_heads or dims[3] != cfg.head_dim:
                problems.append(f"past_key_0 has shape {dims}, the manifest's config implies "
                                f"[batch, {cfg.num_kv_heads}, cache_len, {cfg.head_dim}]")
            if cache.type not in _ORT_TYPES:
                problems.append(f"past_key_0 has type {cache.type}, expected one of {sorted(_ORT_TYPES)}")
        if problems:
            raise ArtifactError(f"{self.model_path} does not match its manifest: " + "; ".join(problems)
                                + ". Rebuild the artifact.")
        self.cache_dtype = _ORT_TYPES[inputs["past_key_0"].type]

    # ---- Engine protocol ----------------------------------------------------------------------------
    @property
    def run_seconds(self) -> float:
        return self._run_s

    def describe(self) -> str:
        kernel = f", int4: {self.int4_kernel}" if self.int4_kernel else ""
        if self.attention:
            kernel += f", attention: {self.attention_kernel}"
        return f"onnxruntime {ort.__version__} {self.providers[0]} ({self.cache_dtype} KV cache{kernel})"

    def allocate(self, batch: int, cache_len: int) -> OrtKVCache:
        cache = OrtKVCache(self, batch)
        self._bind_cache(cache, cache_len, keep=0)
        return cache

    def resize(self, cache: OrtKVCache, cache_len: int, keep: int) -> None:  # type: ignore[override]
        if cache_len != cache.cache_len:
            self._bind_cache(cache, cache_len, keep=min(keep, cache.cache_len, cache_len))

    def _bind_cache(self, cache: OrtKVCache, cache_len: int, keep: int) -> None:
        """(Re)allocate ``cache``'s buffers one at a time, keeping slots ``[0, keep)``.

        One buffer at a time, each old one released as soon as it is copied: a resize needs one extra buffer
        (1 / (2 x layers) of the cache), not a second cache.
        """
        if cache.parent is not None:
            raise ValueError("a row view cannot be resized: resize the cache it is a view of")
        cfg = self.config
        shape = (cache.batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
        cache.views.clear()  # their OrtValues point into the old buffers
        n = len(self._cache_names)
        if len(cache.values) != n:
            cache.values = [None] * n  # type: ignore[list-item]
        if self.device == "cpu" and len(cache.arrays) != n:
            cache.arrays = [None] * n  # type: ignore[list-item]
        for i, name in enumerate(self._cache_names):
            # Zeroed, not empty: masked slots get probability 0, and 0 * NaN from garbage memory would be NaN.
            arr = np.zeros(shape, self._dtype)
            if keep:
                old = cache.arrays[i] if self.device == "cpu" else cache.values[i].numpy()
                arr[:, :, :keep] = old[:, :, :keep]
                del old
            value = ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0)
            cache.binding.bind_ortvalue_input(f"past_{name}", value)
            cache.binding.bind_ortvalue_output(f"present_{name}", value)
            # The last references to this layer's old buffer go here, before the next one is allocated.
            cache.values[i] = value
            if self.device == "cpu":  # the OrtValue wraps this array: in-place updates are visible in it
                cache.arrays[i] = arr
        cache.cache_len = cache_len

    # ---- row views (continuous batching) ---------------------------------------------------------------
    def rows(self, cache: OrtKVCache, start: int, stop: int) -> OrtKVCache:
        """Rows ``[start, stop)`` of ``cache`` as a cache sharing its memory (see the module docstring).

        The logits a step on a view returns are valid until the next step on any view of the same cache."""
        if cache.parent is not None:
            raise ValueError("take row views of the pool, not of a view")
        if not 0 <= start < stop <= cache.batch:
            raise ValueError(f"rows [{start}, {stop}) are outside the cache's {cache.batch} rows")
        view = cache.views.get((start, stop))
        if view is not None:
            return view
        view = OrtKVCache(self, stop - start, logits=cache.logits[:stop - start])
        view.parent, view.cache_len = cache, cache.cache_len
        cfg = self.config
        shape = [stop - start, cfg.num_kv_heads, cache.cache_len, cfg.head_dim]
        row_bytes = cfg.num_kv_heads * cache.cache_len * cfg.head_dim * self.itemsize
        for i, name in enumerate(self._cache_names):
            if self.device == "cpu":
                arr = cache.arrays[i][start:stop]  # contiguous: the row is the outermost dimension
                value = ort.OrtValue.ortvalue_from_numpy(arr)
                view.binding.bind_ortvalue_input(f"past_{name}", value)
                view.binding.bind_ortvalue_output(f"present_{name}", value)
                view.arrays.append(arr)
                view.values.append(value)
            else:
                ptr = cache.values[i].data_ptr() + start * row_bytes
                for kind, io in (("past", view.binding.bind_input), ("present", view.binding.bind_output)):
                    io(f"{kind}_{name}", self.device, 0, _ONNX_ELEMENT_TYPES[self.cache_dtype], shape, ptr)
        cache.views[(start, stop)] = view
        return view

    def copy_rows(self, cache: OrtKVCache, src: int, dst: int, length: int) -> None:
        """Slots ``[0, length)`` of row ``src`` to row ``dst``, in every buffer (the pool stays packed)."""
        if src == dst or length <= 0:
            return
        if self.device == "cpu":
            for arr in cache.arrays:
                arr[dst, :, :length] = arr[src, :, :length]
            return
        from glm_runtime.engine_trt import copy_device_rows  # CUDA: a strided device-to-device copy

        cfg = self.config
        for value in cache.values:
            copy_device_rows(value.data_ptr(), cfg.num_kv_heads, cache.cache_len, cfg.head_dim * self.itemsize,
                             src, dst, length)

    def step_all(self, cache: OrtKVCache, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """A step returning the logits of every input position, ``[batch, seq, vocab]`` (a new array): for
        prompt logprobs. The cache's own logits buffer holds one position per row, so another is bound for this
        call only."""
        batch, seq = input_ids.shape
        out = np.empty((batch, seq, self.config.vocab_size), np.float32)
        index = np.ascontiguousarray(np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)))
        cache.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
        try:
            self.step(cache, input_ids, position_ids, index)
        finally:
            cache.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(cache.logits))
        return out

    # ---- slots to and from host memory (prefix caching) ----------------------------------------------
    def read_slots(self, cache: OrtKVCache, row: int, start: int, stop: int) -> np.ndarray:
        """Slots ``[start, stop)`` of ``row`` in every buffer: ``[2 x layers, kv_heads, n, head_dim]`` (on CUDA
        raw bytes ``[..., n, head_dim x itemsize]`` as uint8: the host copy is only ever written back)."""
        if self.device == "cpu":
            return np.stack([arr[row, :, start:stop] for arr in cache.arrays])
        from glm_runtime.engine_trt import copy_slots_to_host

        cfg = self.config
        out = np.empty((len(cache.values), cfg.num_kv_heads, stop - start, cfg.head_dim * self.itemsize), np.uint8)
        for i, value in enumerate(cache.values):
            copy_slots_to_host(value.data_ptr(), cfg.num_kv_heads, cache.cache_len, row, start, out[i])
        return out

    def write_slots(self, cache: OrtKVCache, row: int, start: int, data: np.ndarray) -> None:
        n = data.shape[2]
        if self.device == "cpu":
            for arr, block in zip(cache.arrays, data, strict=True):
                arr[row, :, start:start + n] = block
            return
        from glm_runtime.engine_trt import copy_slots_from_host

        cfg = self.config
        for value, block in zip(cache.values, data, strict=True):
            copy_slots_from_host(value.data_ptr(), cfg.num_kv_heads, cache.cache_len, row, start, block)

    def step(self, cache: OrtKVCache, input_ids: np.ndarray, position_ids: np.ndarray,  # type: ignore[override]
             logits_index: np.ndarray) -> np.ndarray:
        bound = cache.bound
        for name, arr in (("input_ids", input_ids), ("position_ids", position_ids), ("logits_index", logits_index)):
            if bound.get(name) is not arr:  # the decode loop passes the same (mutated) arrays: no rebinding
                if arr.dtype != np.int64 or not arr.flags.c_contiguous:
                    arr = np.ascontiguousarray(arr, dtype=np.int64)
                cache.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
                bound[name] = arr
        t0 = time.perf_counter()
        self.session.run_with_iobinding(cache.binding)
        self._run_s += time.perf_counter() - t0
        return cache.logits[:, 0, :]


def load_engine(artifact: Path, manifest: dict[str, Any], config: ModelConfig, providers: list[str] | None = None,
                threads: int | None = None, log_severity: int = 2, int4_kernel: str | None = None,
                attention_kernel: str | None = None, hugepages: bool | None = None) -> OrtEngine:
    """``int4_kernel``: ``auto`` / ``ort`` (default: $GLM_RUNTIME_INT4_KERNEL, else auto); used by int4 artifacts.
    ``attention_kernel``: ``auto`` / ``ort`` (default: $GLM_RUNTIME_ATTENTION_KERNEL, else auto).
    ``hugepages``: the int4 kernel's weights onto huge pages (default: $GLM_RUNTIME_HUGEPAGES, else on)."""
    graph = manifest.get("graph", {})
    path = Path(artifact) / graph.get("file", "model.onnx")
    if not path.is_file():
        raise ArtifactError(f"{path} not found: this artifact has no ONNX graph for the ONNX Runtime engine")
    warn_cpu_tuning(manifest)
    mode = cpu_kernel.resolve_mode(int4_kernel)
    attention = cpu_kernel.resolve_mode(attention_kernel, cpu_kernel.ATTENTION_ENV)
    if manifest.get("precision") in ("fp16", "bf16"):  # 16-bit attention inputs: the kernel computes in float32
        attention = "ort"
    return OrtEngine(path, config, providers, threads, log_severity,
                     int4_kernel=mode if manifest.get("precision") == "int4" else None, attention_kernel=attention,
                     hugepages=cpu_kernel.resolve_hugepages(hugepages))


def warn_cpu_tuning(manifest: dict[str, Any]) -> str | None:
    """An int8 graph is built for one kind of CPU (manifest ``cpu_tuning``, see glm_export.quantize.rewrite): full-range
    weights saturate ONNX Runtime's int8 kernels on CPUs without an int8 dot product; 7-bit weights are exact
    everywhere but carry twice the rounding error a VNNI CPU could avoid. Say so once at load; return the text."""
    from glm_runtime.hostinfo import cpu

    tuning = manifest.get("cpu_tuning")
    if not isinstance(tuning, dict):
        return None
    host = cpu()
    if host["int8_dot_product"] is None:
        return None
    built_for = tuning.get("build_host_cpu", "another CPU")
    if tuning.get("needs_int8_dot_product") and not host["int8_dot_product"]:
        text = (f"this int8 artifact has full-range (8-bit) weights for CPUs with an int8 dot product (built on "
                f"{built_for}); this CPU ({host['model']}) has none (no VNNI/AMX), so ONNX Runtime's int8 kernels "
                f"can saturate and lose accuracy: rebuild it here, or with --int8-reduce-range")
    elif tuning.get("int8_weight_range") == 63 and host["int8_dot_product"]:
        text = (f"this int8 artifact has 7-bit weights for CPUs without VNNI (built on {built_for}); this CPU "
                f"({host['model']}) has an int8 dot product: a build here (--int8-full-range) halves the weight "
                f"rounding error at the same speed")
    else:
        return None
    log.warning(text)
    return text
