"""Quantized KV cache: ``past_*`` / ``present_*`` stored as int8 with static per-tensor scales (ONNX Runtime).

The graph's cache update is ``present = TensorScatter(past, update, write_index)`` followed by ``Attention``
reading ``present`` (``docs/graph.md``). With an int8 cache it becomes::

    present_q = TensorScatter(past_q, QuantizeLinear(update, s), write_index)    # the cache buffer, int8
    Attention(..., DequantizeLinear(present_q, s), ...)                          # float for the attention

so the buffers the runtime allocates (and binds in place) are a quarter of fp32, and each token's K/V is
rounded once, when written. The scale s of every cache tensor is its calibrated abs-max / 127: K after RoPE,
and V as the graph holds it, i.e. after SmoothQuant's / AWQ's fold into the V columns of qkv (which divides
V's channels by the o_proj scales; ``quantize.kv_ranges``).

Why int8 only, and only for ONNX Runtime (measured; the errors are the exact messages):

- ONNX Runtime 1.32 CPU has an int8 TensorScatter kernel (in place with IO binding) but none for float8:
  "Could not find an implementation for TensorScatter(24)".
- TensorRT-RTX 1.7 maps TensorScatter to its KV-cache update layer, which refuses both: "cache has type Int8
  but must have type Float, Half, or BFloat16" (and "... type FP8 ..."), so a TensorRT engine cannot hold a
  quantized cache in this graph form; its caches stay fp16 / bf16.

So FP8 (E4M3) caches have no backend here. Their accuracy was measured anyway with the same rounding on a float
cache (QuantizeLinear -> DequantizeLinear on the update): docs/quantization.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

KV_CACHE_DTYPES = ("model", "int8")


def quantize_cache(model: ir.Model, absmax: dict[str, float]) -> dict[str, Any]:
    """Rewrite every ``TensorScatter(past_*)`` of ``model`` as above; return the scales for the report.

    ``absmax`` maps ``past_key_{i}`` / ``past_value_{i}`` to the abs-max of what the graph writes there.
    """
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    scales: dict[str, float] = {}
    for node in list(graph):
        if node.op_type != "TensorScatter" or node.inputs[0] is None or node.inputs[0].name not in inputs:
            continue
        past, update, present = node.inputs[0], node.inputs[1], node.outputs[0]
        name = past.name
        if name not in absmax:
            raise ValueError(f"no calibrated range for {name}")
        ftype = past.type.dtype  # type: ignore[union-attr]
        scale = max(absmax[name], 1e-6) / 127.0
        scales[name] = float(f"{scale:.6g}")
        s = ir.Value(name=f"{name}_kv_scale",
                     const_value=ir.Tensor(np.array(scale, dtype=ftype.numpy()), name=f"{name}_kv_scale"))
        zp = ir.Value(name=f"{name}_kv_zp", const_value=ir.Tensor(np.array(0, dtype=np.int8), name=f"{name}_kv_zp"))
        graph.register_initializer(s)
        graph.register_initializer(zp)
        q = ir.node("QuantizeLinear", [update, s, zp], name=f"{name}/kv_QuantizeLinear")
        graph.insert_before(node, [q])
        node.replace_input_with(1, q.outputs[0])
        users = list(present.uses())
        dq = ir.node("DequantizeLinear", [present, s, zp], name=f"{name}/kv_DequantizeLinear")
        graph.insert_after(node, [dq])
        for user, index in users:
            user.replace_input_with(index, dq.outputs[0])
        dq.outputs[0].type = ir.TensorType(ftype)
        dq.outputs[0].shape = present.shape
        past.type = ir.TensorType(ir.DataType.INT8)
        present.type = ir.TensorType(ir.DataType.INT8)
    if not scales:
        raise ValueError("the graph has no TensorScatter cache update on a past_* input (docs/graph.md)")
    return {"dtype": "int8", "scales": scales}
