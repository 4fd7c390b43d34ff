"""The bandwidth roofline of decoding: measured read bandwidth and the bytes one decode step must read.

Decoding one token per sequence multiplies every weight matrix by a handful of vectors: the CPU (or GPU)
spends its time streaming the weights from memory, not computing. So the fastest a decode step can be is
``bytes read per step / read bandwidth``, and ``fraction of bound`` says how close an implementation gets.

Bandwidth is measured, never assumed, by several probes, and the bound uses the highest (so the fraction
reported against it is conservative): numpy's and torch's ``sum`` are partly compute bound on CPUs without
wide vector units and understate streaming reads; a fp32 matrix-vector product (OpenBLAS through numpy, and
ONNX Runtime's own MatMul, the op decoding runs) reads its matrix once, as decoding does.

Bytes per step: every weight initializer of the graph except the embedding table (a Gather reads one row per
token), at its stored width (int4 blocks, their scales and zero points included), plus the KV cache buffer,
which ONNX Runtime's CPU attention reads whole (``cache_len`` rounded as the runtime sizes it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

EMBEDDING = "embed.weight"


def _best_gb_s(fn: Callable[[], Any], nbytes: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / min(times) / 1e9


def measure_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth in GB/s over a ``gib``-GiB buffer, best of ``repeats`` per probe.

    ``read_gb_s`` is the highest read probe (the one the roofline uses); ``copy_read+write`` is reported for
    reference only (it counts read and written bytes). Run it in a process of its own: the buffer is large.
    """
    import numpy as np

    n = int(gib * 2**30) // 4 // 4096 * 4096
    a = np.ones(n, np.float32)
    out: dict[str, float] = {"numpy_sum_1thread": _best_gb_s(a.sum, a.nbytes, repeats)}
    with ThreadPoolExecutor(threads) as pool:
        parts = np.array_split(a, 8 * threads)
        out[f"numpy_sum_{threads}threads"] = _best_gb_s(lambda: list(pool.map(np.sum, parts)), a.nbytes, repeats)
    matrix, vector = a.reshape(-1, 4096), np.ones(4096, np.float32)
    out["numpy_gemv"] = _best_gb_s(lambda: matrix @ vector, a.nbytes, repeats)
    try:
        import torch

        torch.set_num_threads(threads)
        t = torch.from_numpy(a)
        out["torch_sum"] = _best_gb_s(t.sum, a.nbytes, repeats)
    except ImportError:  # the probe is optional: torch is the build side's, not the runtime's
        pass
    out["ort_gemv"] = _ort_gemv(matrix, threads, repeats)
    b = np.empty_like(a)
    out["copy_read+write"] = _best_gb_s(lambda: np.copyto(b, a), 2 * a.nbytes, repeats)
    out["read_gb_s"] = max(v for k, v in out.items() if k != "copy_read+write")
    return out


def _ort_gemv(matrix: Any, threads: int, repeats: int) -> float:
    """ONNX Runtime's fp32 MatMul of one row vector by ``matrix`` (``[k, 4096]``): the decode workload."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = matrix.shape
    w = numpy_helper.from_array(matrix, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del w, model, graph
    x = {"x": np.ones((1, k), np.float32)}
    sess.run(None, x)
    return _best_gb_s(lambda: sess.run(None, x), matrix.nbytes, repeats)


def initializer_bytes(model_path: Path) -> dict[str, int]:
    """Stored bytes of every initializer of an ONNX graph, from its header only (no weights are read)."""
    import numpy as np
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            bits = 4
        else:
            bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        sizes[t.name] = (n * bits + 7) // 8
    return sizes


def kv_itemsize(model_path: Path) -> int:
    """Bytes per element of the graph's KV cache (``past_key_0``), whatever the weights' precision."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    cache = next(i for i in graph.input if i.name == "past_key_0")
    return onnx.helper.tensor_dtype_to_np_dtype(cache.type.tensor_type.elem_type).itemsize


def weight_bytes_per_step(model_path: Path) -> tuple[int, int]:
    """``(all weight bytes, bytes a decode step reads)``: the latter is every initializer but the embedding."""
    sizes = initializer_bytes(model_path)
    total = sum(sizes.values())
    return total, total - sizes.get(EMBEDDING, 0)


def torch_weight_bytes_per_step(num_parameters: int, embedding_parameters: int, dtype_bytes: int) -> int:
    """Bytes a PyTorch decode step reads: its parameters but the embedding, at the dtype it runs in."""
    return (num_parameters - embedding_parameters) * dtype_bytes


def kv_bytes_per_step(kv_bytes_per_token: int, batch: int, cache_len: int) -> int:
    """KV bytes a decode step reads: the whole buffer of every sequence (ORT's CPU attention reads all of it)."""
    return kv_bytes_per_token * batch * cache_len


def decode_bound(read_gb_s: float, bytes_per_step: int) -> float:
    """Decode steps per second (= tokens/s per sequence) when bandwidth is the only limit."""
    return read_gb_s * 1e9 / bytes_per_step
