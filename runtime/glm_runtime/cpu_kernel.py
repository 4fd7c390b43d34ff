"""The runtime's int4 CPU kernel: ``com.microsoft::MatMulNBits`` (4-bit, symmetric) from ``csrc/q4_matmul.c``.

Why: a decode step of an int4 GLM-4-9B reads ~5 GB of weights, so its speed is the speed those weights are read
at. ONNX Runtime's MatMulNBits reads them at ~20 GB/s on a 2-core Xeon with 32 GB/s of read bandwidth; this kernel
streams each weight row with prefetch and reaches ~30 GB/s (docs/runtime.md, "int4 kernel"). The graph is not
changed: the library registers its kernel under MatMulNBits' own name and domain for this session only, and reads
the weights in MatMulNBits' layout, so the artifact stays portable and ``--int4-kernel ort`` runs it on ONNX
Runtime's kernel with the same numbers (both quantize activations to int8 per block: accuracy_level 4).

What it takes: 4-bit weights without zero points (glm-export's default), float32 activations, the CPU provider.
A graph with anything else is refused by ONNX Runtime's schema check or counted by the library when the session
creates its kernels; the engine then builds the session again without it and says why.

The same library carries a second kernel, ONNX's ``Attention`` (``csrc/attention.c``, any precision's graph):
ONNX Runtime's CPU Attention computes every slot of the KV buffer, this one only the slots the mask admits, once
per KV group. It is registered in the ONNX domain for a session only on request (``configure(attention=...)``),
on CPUs with AVX-512 or AVX2 + FMA (``attention_unavailable``), and a node of another form goes back to ONNX Runtime's.

Huge pages (``csrc/hugepages.c``): after a MatMulNBits node first runs, a background thread copies its weights from
the artifact's file onto transparent huge pages and the node switches to them: the hardware prefetchers stop at
every 4 KB page of ONNX Runtime's file mapping (GLM-4-9B int4 decode step 185 -> 165 ms, docs/runtime.md, "Huge
pages"). ``hugepages`` / $GLM_RUNTIME_HUGEPAGES=0 turn it off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODULE = "glm_runtime._q4_matmul"
MODES = ("auto", "ort")
ENV = "GLM_RUNTIME_INT4_KERNEL"
ATTENTION_ENV = "GLM_RUNTIME_ATTENTION_KERNEL"
HUGEPAGES_ENV = "GLM_RUNTIME_HUGEPAGES"


@dataclass(frozen=True)
class Q4Kernel:
    """The loaded library (one per process: its thread pool is shared by every session that registers it)."""

    path: Path
    lib: ctypes.CDLL
    threads: int
    isa: str

    def calls(self) -> int:
        """How many MatMulNBits nodes it has run: proof the session uses it."""
        return int(self.lib.glm_q4_calls())

    def unsupported(self) -> int:
        """MatMulNBits nodes it was asked to create but cannot run (bits, block size)."""
        return int(self.lib.glm_q4_unsupported())

    def bad_inputs(self) -> int:
        """Runs refused because a node's tensors do not match its attributes (weights from a damaged artifact)."""
        return int(self.lib.glm_q4_bad_inputs())

    def describe(self) -> str:
        return f"glm-runtime int4 kernel ({self.isa}, {self.threads} threads)"

    def hugepage_bytes(self) -> int:
        """Bytes of int4 weights the kernel now reads from huge-page copies (they are made in the background)."""
        return int(self.lib.glm_huge_bytes())

    def hugepage_queued_bytes(self) -> int:
        """Bytes queued for a huge-page copy not made yet: anonymous memory this process is about to take."""
        return int(self.lib.glm_huge_queued_bytes())

    def hugepage_pending(self) -> int:
        """Nodes whose huge-page copy is queued or made but not yet in use (each switches on its next run)."""
        return int(self.lib.glm_huge_pending())

    def attention_calls(self) -> int:
        """How many Attention nodes the library's attention (csrc/attention.c) has run."""
        return int(self.lib.glm_attention_calls())

    def attention_unsupported(self) -> int:
        """Attention nodes it was asked to create with attributes it does not implement."""
        return int(self.lib.glm_attention_unsupported())

    def attention_bad_inputs(self) -> int:
        """Attention runs refused because the inputs are not Q, K, V [batch, heads, rows, dim] and a bool mask
        [batch or 1, 1, rows, slots]."""
        return int(self.lib.glm_attention_bad_inputs())


def attention_unavailable(kernel: Q4Kernel) -> str | None:
    """Why the library's Attention should not stand in on this CPU, or None. Its AVX-512 and AVX2 paths are faster
    than ONNX Runtime's at every context (docs/runtime.md, "The attention kernel"); the scalar path exists for
    tests. Whether a graph's Attention nodes have the form it
    implements is checked where the runtime can see them without the onnx package: attributes when the session
    creates the kernels (Q4Kernel.attention_unsupported), shapes on the engine's load-time step
    (Q4Kernel.attention_bad_inputs); either sends the graph back to ONNX Runtime's Attention."""
    isa = kernel.lib.glm_attention_isa().decode()
    return None if isa in ("avx512", "avx2") else f"the runtime's attention has no fast path on this CPU ({isa})"


ATTENTION_OFF, ATTENTION_POOL, ATTENTION_CALLING_THREAD = 0, 1, 2


def attention_mode(kernel: Q4Kernel, matmul: bool) -> int:
    """How the library's Attention runs in a session (``configure(attention=...)``): off where
    ``attention_unavailable``; on the library's pool where its MatMulNBits runs (``matmul``: the pool is warm at
    that point of a step); otherwise on the calling thread, beside ONNX Runtime's pool, which a second spinning pool
    would take a core from (GLM-4-9B int4 at 576 slots, pool vs calling thread: 196-204 vs 214-223 ms a step)."""
    if attention_unavailable(kernel) is not None:
        return ATTENTION_OFF
    return ATTENTION_POOL if matmul else ATTENTION_CALLING_THREAD


def configure(opts: Any, kernel: Q4Kernel, matmul: bool = True, attention: int = 0,
              hugepages: bool = True) -> list[str]:
    """Put ``kernel`` into ONNX Runtime session options ``opts``; returns the graph optimizers to disable.

    ``matmul``: its MatMulNBits stands in for ONNX Runtime's. ``attention``: its Attention too, with the work
    split over its pool (``ATTENTION_POOL``, for int4 sessions whose matmuls use that pool) or on the calling
    thread (``ATTENTION_CALLING_THREAD``: in a session whose matmuls run on ONNX Runtime's pool, a second pool
    spinning beside it would take a core from it); 0: not.

    ORT's MatMulNBits+Add fusion writes the 6-input form (bias as input 5) and the kernel takes 3, so the bias Add
    stays a node (4608 floats on GLM-4-9B's qkv: nothing beside its weights). ORT's pool and the kernel's share
    the cores: ORT's workers spinning between ops took a core from the kernel (GLM-4-9B int4 decode 2.2 tok/s with
    spinning, 4.5 without), so they sleep instead.

    ``hugepages``: move the int4 weights onto huge pages after their first run (module docstring). The library
    reads this when a node first runs, so it holds for the nodes of every session that first runs after this call.
    """
    with _lock:  # the library reads what to register when ONNX Runtime calls it, inside this call
        kernel.lib.glm_huge_select(int(hugepages))
        kernel.lib.glm_q4_select(int(matmul), attention)
        opts.register_custom_ops_library(str(kernel.path))
        kernel.lib.glm_q4_select(1, 0)
    if not matmul:
        return []
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ["MatMulNBitsFusion"]


# Held for the life of the process: the ctypes handle keeps the library mapped (its pool's threads run its code)
# even when ONNX Runtime drops its own handle with a session's options.
_loaded: Q4Kernel | None = None
_lock = threading.Lock()


def library_path() -> Path | None:
    """The compiled library, or None when the install had no C compiler."""
    spec = importlib.util.find_spec(MODULE)
    return Path(spec.origin) if spec and spec.origin else None


def resolve_mode(mode: str | None, env: str = ENV) -> str:
    """``mode`` if given, else $``env`` (GLM_RUNTIME_INT4_KERNEL or GLM_RUNTIME_ATTENTION_KERNEL), else ``auto``;
    an unknown value is an error."""
    value = mode if mode is not None else os.environ.get(env, "auto")
    if value not in MODES:
        what = "int4 kernel" if env == ENV else "attention kernel"
        raise ValueError(f"{what} must be one of {', '.join(MODES)}, got {value!r}"
                         + (f" (from ${env})" if mode is None else ""))
    return value


def resolve_hugepages(on: bool | None) -> bool:
    """``on`` if given, else $GLM_RUNTIME_HUGEPAGES (``0`` or ``1``), else on."""
    if on is not None:
        return on
    value = os.environ.get(HUGEPAGES_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"${HUGEPAGES_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def attention_isa() -> str:
    """The path the library's attention takes on this CPU (``avx512``, ``avx2`` or ``scalar``)."""
    return _loaded.lib.glm_attention_isa().decode() if _loaded is not None else "not loaded"


def load(threads: int | None) -> Q4Kernel | None:
    """The library with its pool sized once, for the first caller's thread count (default: usable cores).

    Returns None when it is not built or this CPU has no SIMD path for it (then ONNX Runtime's kernel is faster)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            if threads and threads != _loaded.threads:
                log.info("the int4 kernel's pool already has %d threads (asked for %d in this process)",
                         _loaded.threads, threads)
            return _loaded
        path = library_path()
        if path is None:
            log.info("the int4 kernel is not built (no C compiler at install): using ONNX Runtime's MatMulNBits")
            return None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            log.warning("cannot load %s (%s): using ONNX Runtime's MatMulNBits", path, e)
            return None
        lib.glm_q4_isa.restype = ctypes.c_char_p
        lib.glm_q4_calls.restype = ctypes.c_long
        lib.glm_q4_unsupported.restype = ctypes.c_long
        lib.glm_q4_bad_inputs.restype = ctypes.c_long
        lib.glm_attention_calls.restype = ctypes.c_long
        lib.glm_attention_unsupported.restype = ctypes.c_long
        lib.glm_attention_bad_inputs.restype = ctypes.c_long
        lib.glm_q4_select.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.glm_huge_select.argtypes = [ctypes.c_int]
        lib.glm_huge_bytes.restype = ctypes.c_longlong
        lib.glm_huge_queued_bytes.restype = ctypes.c_longlong
        lib.glm_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int]
        lib.glm_attention_isa.restype = ctypes.c_char_p
        lib.glm_q4_set_threads.argtypes = [ctypes.c_int]
        lib.glm_q4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        isa = lib.glm_q4_isa().decode()
        if isa == "scalar":
            log.info("this CPU has no AVX2: using ONNX Runtime's MatMulNBits")
            return None
        want = threads or len(os.sched_getaffinity(0))
        _loaded = Q4Kernel(path, lib, int(lib.glm_q4_set_threads(want)), isa)
        return _loaded
