"""Quantization of the exported graph with calibration: FP8, INT8 (SmoothQuant), INT4 weight-only (RTN / AWQ).

The flow (``quantize_into``): calibrate the PyTorch model (``calibrate.py``) -> free it -> rewrite the fp32
graph's MatMuls in place -> measure accuracy on held-out text against PyTorch fp32 (``accuracy.py``).

Every quantized MatMul is one of ``layers.*.{qkv,o_proj,gate_up,down}`` and ``lm_head``, found by the name of
its weight initializer (the graph stores them ``[in, out]`` under canonical names, ``docs/graph.md``). What
stays in higher precision, and why:

- the embedding (a Gather reads one row per token: no bandwidth to save, any error hits every token);
- RMSNorm weights and the qkv bias (tiny; they also absorb the smoothing scales);
- attention, rotary and softmax; the KV cache unless ``kv_cache="int8"`` (then int8 with static scales).

Rescaling that folds exactly into the graph (x' = x / s, W' = diag(s) W, the product unchanged), used by
SmoothQuant (int8) and AWQ (int4): qkv <- input_norm weight, gate_up <- post_attn_norm weight, lm_head <-
final_norm weight, down <- the ``up`` half of gate_up (silu(gate) * up is linear in up), o_proj <- the V
columns and bias of qkv (attention is linear in V per channel; with GQA every head of a group reads the same V
channel, so those heads share one scale). Consequence: the cache holds V / s, invisible outside the graph.

Graph forms (written by hand with onnx_ir: ORT's quantizer has no SmoothQuant/AWQ/FP8 for this graph and
modelopt's export does not fit opset 24, see ``docs/quantization.md``):

- int8: ``Q(x; a, 0) -> DQ -> MatMul(., DQ(W_int8; w[axis=1]))``, static per-tensor activation scale, per
  output channel weight scale with *no* zero point (a shared scalar zero point on a per-channel DQ breaks ORT
  and TensorRT). ORT CPU fuses it to int8 kernels; TensorRT runs it as an int8 GEMM.
- fp8: the same with float8e4m3fn, the layout TensorRT's FP8 GEMM fusion expects; on ORT CPU the Q/DQ run as
  plain ops (the numerical reference).
- int4: ``com.microsoft::MatMulNBits`` (ORT CPU, ``int4_format="nbits"``; asymmetric blocks with 4-bit zero
  points by default) or a blocked ``DequantizeLinear(block_size)`` on an int4 initializer (TensorRT, ``"qdq"``;
  symmetric with positive scales, all TensorRT's IDequantizeLayer accepts). Block scales come from a per-block
  clip search (``quant_int4.py``).
- int8 KV cache (``kv_cache="int8"``, ONNX Runtime only): ``quant_kv.py``.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from glm_export import accuracy, calibrate, quant_int4, quant_kv
from glm_export.calibrate import CalibrationError, Stats
from glm_export.progress import console
from glm_export.quant_int4 import CLIP_METHODS, Int4Blocks

QUANTIZED_PRECISIONS = ("fp8", "int8", "int4")
WEIGHT_METHODS = ("rtn", "awq")
BLOCK_SIZES = (32, 64, 128)
KV_CACHE_CHOICES = quant_kv.KV_CACHE_DTYPES
INT4_FORMATS = ("nbits", "qdq")
LM_HEAD_CHOICES = ("same", "float", "int8")
FP8_MAX = 448.0
AWQ_GRID = 20


class QuantizeError(ValueError):
    """Quantization options or input that cannot work; the message names the fix."""


@dataclass(frozen=True)
class QuantOptions:
    """Everything the CLI lets a user choose about quantization (defaults are the documented ones)."""

    calibration: str = "default"  # "default" (shipped set), or a path to .jsonl / .txt
    calib_samples: int = 256
    calib_seq_len: int = 512
    smoothquant_alpha: float = 0.5  # int8; 0 disables smoothing (naive per-tensor W8A8)
    # int4 block size (32, 64 or 128). 32: measured on glm-4-9b-2layer, KL 0.116 vs 0.246 (block 128, the earlier
    # scheme) for ~20% more bytes per weight (5.1 vs 4.3 bits with fp32 scales and zero points)
    weight_block: int = 32
    weight_method: str = "awq"  # "rtn" or "awq"
    weight_clip: str = "mse"  # int4 block scales: "mse" (clip-ratio search + least-squares refit) or "none"
    # int4 zero points (asymmetric blocks): None = where the backend takes them (ONNX Runtime's MatMulNBits yes,
    # TensorRT's DequantizeLinear no: it accepts only zero-valued zero points)
    weight_zero_point: bool | None = None
    kv_cache: str = "model"  # "model" (graph dtype) or "int8" (static per-tensor scales, ONNX Runtime; quant_kv.py)
    int4_format: str = "nbits"  # "nbits" (ORT MatMulNBits) or "qdq" (blocked DequantizeLinear, TensorRT)
    # Output layer: "same" (the artifact's precision and method), "float" (left in the graph's float type: fp32 on
    # ONNX Runtime, fp16 for TensorRT) or "int8" (W8A8 per-channel with SmoothQuant, as --precision int8, inside an
    # int4 / fp8 artifact). Its error reaches every logit directly; llama.cpp keeps it at 6 bits in Q4_K_M.
    lm_head: str = "same"
    # int8 weights in [-63, 63] (ORT's reduce_range) or the full [-127, 127]. None: chosen for the build host
    # (resolve_host_options). ONNX Runtime's x86 int8 kernels without an int8 dot product (AVX2 only) add u8*s8
    # pairs in int16 and saturate with full-range weights (measured: 0.3 abs error on a 200-deep dot product, exact
    # with 7 bits); with VNNI / AMX / Arm dotprod they accumulate in int32 and full range halves the weight rounding
    # error at the same speed (docs/quantization.md). TensorRT: always full range.
    int8_reduce_range: bool | None = None
    backend: str = "onnxruntime"  # set by options_for_backend: what the graph must run on
    accuracy_samples: int = 8  # held-out sequences for the accuracy report (0: skip it)
    target_compute_capability: float | None = None  # GPU the artifact is for, when known (fp8 needs >= 8.9)


def options_for_backend(options: QuantOptions, backend: str) -> QuantOptions:
    """The graph forms each backend runs best: MatMulNBits and 7-bit int8 weights for ONNX Runtime CPU,
    blocked DequantizeLinear and full-range int8 for TensorRT (whose MatMulNBits importer wants fp16 inputs
    and whose int8 GEMMs do not saturate)."""
    if backend == "onnxruntime":
        return options
    zp = False if options.weight_zero_point is None else options.weight_zero_point
    return replace(options, int4_format="qdq", int8_reduce_range=False, weight_zero_point=zp, backend=backend)


def resolve_host_options(options: QuantOptions) -> QuantOptions:
    """Fill in what depends on the CPU the graph will run on, judged by the build host: the int8 weight range.
    An unknown CPU gets the 7-bit range, which is exact everywhere."""
    if options.int8_reduce_range is not None:
        return options
    if options.backend != "onnxruntime":
        return replace(options, int8_reduce_range=False)
    from glm_runtime.hostinfo import int8_dot_product

    return replace(options, int8_reduce_range=int8_dot_product() is not True)


def cpu_tuning(options: QuantOptions) -> dict[str, Any]:
    """The manifest's record of which CPUs an int8 ONNX Runtime graph was tuned for (the runtime checks it)."""
    from glm_runtime.hostinfo import cpu

    host = cpu()
    full = not resolve_host_options(options).int8_reduce_range
    return {"int8_weight_range": 127 if full else 63, "needs_int8_dot_product": full,
            "build_host_cpu": host["model"], "build_host_isa": host["isa"]}


def int4_zero_point(options: QuantOptions) -> bool:
    """Whether int4 blocks get zero points: only when asked for. On glm-4-9b-2layer (ONNX Runtime CPU, 2 threads)
    zero points cut the mean KL from 0.155 to 0.116 (top-1 0.27 -> 0.30) but MatMulNBits decodes 10% slower with
    them (28.8 vs 32.0 tok/s, one interleaved run), and symmetric blocks are what TensorRT takes too: one default
    for both backends, with ``--weight-zero-point`` for the extra accuracy on ONNX Runtime."""
    return bool(options.weight_zero_point)


def check_options(precision: str, options: QuantOptions) -> None:
    """Refuse bad quantization input before any expensive work (called by ``build`` first)."""
    if precision not in QUANTIZED_PRECISIONS:
        raise QuantizeError(f"unknown quantized precision {precision!r}: choose one of "
                            f"{', '.join(QUANTIZED_PRECISIONS)} (or fp32 / fp16 / bf16 for an unquantized artifact)")
    cc = options.target_compute_capability
    if precision == "fp8" and cc is not None and cc < 8.9:
        raise QuantizeError(f"fp8 needs a GPU of compute capability 8.9+ (Ada, Hopper, Blackwell); the target has "
                            f"{cc}: use --precision int8 (SmoothQuant) or int4 there")
    if not 0.0 <= options.smoothquant_alpha <= 1.0:
        raise QuantizeError(f"--smoothquant-alpha {options.smoothquant_alpha} is outside [0, 1] (0.5 is the usual)")
    if options.weight_block not in BLOCK_SIZES:
        raise QuantizeError(f"--weight-block {options.weight_block}: choose one of {BLOCK_SIZES} (32 default)")
    if options.weight_method not in WEIGHT_METHODS:
        raise QuantizeError(f"--weight-method {options.weight_method!r}: choose one of {WEIGHT_METHODS}")
    if options.weight_clip not in CLIP_METHODS:
        raise QuantizeError(f"--weight-clip {options.weight_clip!r}: choose one of {CLIP_METHODS} (mse default)")
    if options.weight_zero_point and options.int4_format == "qdq":
        raise QuantizeError("int4 zero points (--weight-zero-point) do not work on TensorRT: its DequantizeLinear "
                            "accepts only zero-valued zero points. Use --no-weight-zero-point (symmetric blocks) "
                            "for TensorRT backends")
    if options.lm_head not in LM_HEAD_CHOICES:
        raise QuantizeError(f"--lm-head {options.lm_head!r}: choose one of {LM_HEAD_CHOICES}")
    if options.lm_head == "int8" and precision == "int8":
        raise QuantizeError("--lm-head int8 is what --precision int8 does already: use --lm-head same")
    if options.kv_cache not in KV_CACHE_CHOICES:
        raise QuantizeError(f"--kv-cache-dtype {options.kv_cache!r}: choose one of {KV_CACHE_CHOICES} ('model' keeps "
                            f"the graph's float type)")
    if options.kv_cache == "int8" and options.backend != "onnxruntime":
        raise QuantizeError("TensorRT's KV-cache update takes only float / half / bfloat16 caches: drop "
                            "--kv-cache-dtype int8 for TensorRT backends (it is for --backend onnxruntime)")
    if options.int4_format not in INT4_FORMATS:
        raise QuantizeError(f"int4 format {options.int4_format!r}: choose one of {INT4_FORMATS}")
    if options.calib_seq_len < calibrate.MIN_TOKENS:
        raise QuantizeError(f"--calib-seq-len {options.calib_seq_len} is too short; use 512 (default) or more")
    try:
        calibrate.check_calibration(options.calibration, options.calib_samples)
    except CalibrationError as e:
        raise QuantizeError(str(e)) from None


# ---- numerics (numpy; weights are [in, out]) -------------------------------------------------------------------

def quant_int8_channel(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: (q [in, out] int8 in [-qmax, qmax], scale [out] fp32)."""
    scale = np.maximum(np.abs(w).max(0), 1e-12).astype(np.float32) / qmax
    return np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8), scale


def quant_fp8_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel E4M3: the channel's abs-max maps to 448 (the largest finite E4M3)."""
    scale = np.maximum(np.abs(w).max(0), 1e-12).astype(np.float32) / FP8_MAX
    return (w / scale).astype(ml_dtypes.float8_e4m3fn), scale


def quant_int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks along ``in``: (q [in_padded, out] int8 in [-8, 7], scale [blocks, out] fp32)."""
    k, n = w.shape
    pad = -k % block
    wp = np.pad(w, ((0, pad), (0, 0))) if pad else w
    blocks = wp.reshape(-1, block, n)
    scale = np.maximum(np.abs(blocks).max(1), 1e-12).astype(np.float32) / 7.0
    q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8)
    return q.reshape(-1, n), scale


def dequant_int4_blocks(q: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    block = q.shape[0] // scale.shape[0]
    return (q.reshape(scale.shape[0], block, -1) * scale[:, None, :]).reshape(q.shape)[:k]


def int4_output_error(x: np.ndarray, w: np.ndarray, blocks: Int4Blocks, max_cols: int = 4096) -> float:
    """Relative squared error of x @ W_int4 against x @ W on the sampled rows (wide layers: a column subset)."""
    if x.size == 0:
        return float("nan")
    cols = np.arange(w.shape[1])
    if w.shape[1] > max_cols:
        cols = np.sort(np.random.default_rng(0).choice(w.shape[1], max_cols, replace=False))
    sub = Int4Blocks(blocks.q[:, cols], blocks.scale[:, cols], None if blocks.zero is None else blocks.zero[:, cols],
                     blocks.k)
    ref = x @ w[:, cols]
    return float(((x @ sub.dequant() - ref) ** 2).sum() / max(float((ref**2).sum()), 1e-30))


def smooth_scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), bounded so folding stays well conditioned."""
    s = np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def awq_search(x: np.ndarray, w: np.ndarray, absmean: np.ndarray, block: int, tie: Any) -> tuple[np.ndarray, float,
                                                                                                     float]:
    """AWQ's grid search: s = mean|x|^a; pick the a whose int4(W diag(s)) / s best reproduces x @ W.

    Returns (s, best error, round-to-nearest error) as relative squared errors on the sampled rows.
    Very wide layers (lm_head) are searched on a fixed subset of output columns.
    """
    if w.shape[1] > 4096:
        cols = np.random.default_rng(0).choice(w.shape[1], 4096, replace=False)
        w = w[:, np.sort(cols)]
    ref = x @ w
    norm = float((ref**2).sum()) or 1.0
    best: tuple[float, np.ndarray] | None = None
    rtn = 0.0
    for i in range(AWQ_GRID):
        a = i / AWQ_GRID
        s = tie(np.maximum(absmean, 1e-6) ** a)  # o_proj: equal over the heads sharing a V channel
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        q, sc = quant_int4_blocks(w * s[:, None], block)
        err = float(((x @ (dequant_int4_blocks(q, sc, w.shape[0]) / s[:, None]) - ref) ** 2).sum()) / norm
        if i == 0:
            rtn = err
        if best is None or err < best[0]:
            best = (err, s)
    assert best is not None
    return best[1], best[0], rtn


# ---- which tensors fold into which -------------------------------------------------------------------------------

class Weights:
    """The initializers quantization edits, as fp32 numpy copies made on first use (written back by the caller)."""

    def __init__(self, graph: ir.Graph, cfg: Any) -> None:
        self.graph, self.cfg, self.arrays = graph, cfg, {}  # type: ignore[var-annotated]
        self.v_scales: dict[int, np.ndarray] = {}  # layer -> what V's channels were divided by (o_proj folds)
        # Each MatMul's RMSNorm scale, found through the graph: in fp16 / bf16 graphs the exporter folds the
        # norm weight's cast to fp32 into an anonymous initializer, so its canonical name is gone.
        self.norms: dict[str, str] = {}
        for node in graph:
            if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].is_initializer():
                src = node.inputs[0].producer() if node.inputs[0] is not None else None
                while src is not None and src.op_type == "Cast":
                    src = src.inputs[0].producer()
                if src is not None and src.op_type == "RMSNormalization" and src.inputs[1].is_initializer():
                    self.norms[node.inputs[1].name] = src.inputs[1].name

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = np.array(self.graph.initializers[name].const_value.numpy(), dtype=np.float32)
        return self.arrays[name]

    def has(self, name: str) -> bool:
        return name in self.graph.initializers

    def tie(self, module: str) -> Any:
        """For o_proj, a function that makes a per-q-channel vector equal over the heads of each KV group."""
        cfg = self.cfg
        if not module.endswith("o_proj.weight"):
            return lambda v, reduce=None: v
        hpg = cfg.num_heads // cfg.num_kv_heads

        def tie(v: np.ndarray, reduce: Any = np.max) -> np.ndarray:
            g = reduce(v.reshape(cfg.num_kv_heads, hpg, cfg.head_dim), axis=1)
            return np.repeat(g[:, None, :], hpg, axis=1).reshape(-1)
        return tie

    def fold(self, module: str, s: np.ndarray) -> None:
        """Make the input of ``module`` x / s and its weight diag(s) W; the graph computes the same function."""
        cfg = self.cfg
        np.multiply(self[module], s[:, None], out=self[module])
        if module in self.norms:  # qkv, gate_up, lm_head
            norm = self[self.norms[module]]
            np.divide(norm, s, out=norm)
            return
        parts = module.split(".")
        kind = parts[-2]
        p = f"layers.{parts[1]}."
        if kind not in ("down", "o_proj"):
            raise QuantizeError(f"cannot find the RMSNormalization that feeds {module} in the graph")
        elif kind == "down":
            up = self[p + "gate_up.weight"][:, cfg.ffn_hidden_size:]
            np.divide(up, s[None, :], out=up)
        elif kind == "o_proj":
            sv = s.reshape(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)[:, 0].reshape(-1)
            v0 = cfg.q_size + cfg.kv_size
            v = self[p + "qkv.weight"][:, v0:]
            np.divide(v, sv[None, :], out=v)
            layer = int(parts[1])
            self.v_scales[layer] = self.v_scales.get(layer, np.ones_like(sv)) * sv
            if self.has(p + "qkv.bias"):
                bias = self[p + "qkv.bias"][v0:]
                np.divide(bias, sv, out=bias)


def targets(cfg: Any, options: QuantOptions) -> list[str]:
    names = [f"layers.{i}.{m}.weight" for i in range(cfg.num_layers) for m in ("qkv", "o_proj", "gate_up", "down")]
    return names + (["lm_head.weight"] if options.lm_head != "float" else [])


def module_precision(name: str, precision: str, options: QuantOptions) -> str:
    """The precision one MatMul gets: the artifact's, except an int8 output layer (``lm_head="int8"``)."""
    return "int8" if name == "lm_head.weight" and options.lm_head == "int8" else precision


# ---- graph edits ---------------------------------------------------------------------------------------------------

class Rewriter:
    def __init__(self, model: ir.Model) -> None:
        self.model, self.graph = model, model.graph
        self.users = {n.inputs[1].name: n for n in self.graph if n.op_type == "MatMul" and n.inputs[1] is not None
                      and n.inputs[1].is_initializer()}
        # The graph's float type (fp32 for ORT CPU; fp16 / bf16 for TensorRT, which has no fp32 attention): scales
        # and rewritten weights take it, so DequantizeLinear outputs what the MatMul expects.
        first = next(iter(self.users.values()), None)
        self.ftype = first.inputs[1].const_value.dtype.numpy() if first is not None else np.dtype(np.float32)

    def fconst(self, name: str, array: np.ndarray) -> ir.Value:
        return self.const(name, np.ascontiguousarray(array).astype(self.ftype))

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def replace(self, name: str, array: np.ndarray) -> None:
        value = self.graph.initializers[name]
        value.const_value = ir.Tensor(np.ascontiguousarray(array).astype(value.const_value.dtype.numpy()), name=name)

    def _drop_weight(self, node: ir.Node) -> ir.Value:
        old = node.inputs[1]
        del self.graph.initializers[old.name]
        return old

    def qdq(self, name: str, wq: np.ndarray, wscale: np.ndarray, ascale: float | None, zero: np.ndarray) -> None:
        """``Q/DQ(x) @ DQ(W)`` (per-channel weight, no weight zero point); ``ascale`` None: weight-only."""
        node = self.users[name]
        self._drop_weight(node)
        wdq = ir.node("DequantizeLinear", [self.const(name + "_quantized", wq), self.fconst(name + "_scale", wscale)],
                      {"axis": 1}, name=name + "/DequantizeLinear")
        nodes = [wdq]
        if ascale is not None:
            act = [self.fconst(name + "_act_scale", np.array(ascale)), self.const(name + "_act_zp", zero)]
            q = ir.node("QuantizeLinear", [node.inputs[0], *act], name=name + "/act_QuantizeLinear")
            dq = ir.node("DequantizeLinear", [q.outputs[0], *act], name=name + "/act_DequantizeLinear")
            nodes = [q, dq, wdq]
            node.replace_input_with(0, dq.outputs[0])
        self.graph.insert_before(node, nodes)
        node.replace_input_with(1, wdq.outputs[0])

    def int4(self, name: str, blocks: Int4Blocks, fmt: str) -> None:
        """Blocked int4: ``MatMulNBits`` (ORT) or ``MatMul(x, DQ(W_int4, block_size))`` (TensorRT, symmetric)."""
        node = self.users[name]
        self._drop_weight(node)
        q, scale, k = blocks.q, blocks.scale, blocks.k
        n_blocks, n = scale.shape
        block = blocks.block
        if fmt == "qdq":
            if blocks.zero is not None:
                raise QuantizeError("the blocked DequantizeLinear form (TensorRT) takes symmetric int4 only")
            qv = self.const(name + "_quantized", q[:k].astype(ml_dtypes.int4))
            dq = ir.node("DequantizeLinear", [qv, self.fconst(name + "_scale", scale)],
                         {"axis": 0, "block_size": block}, name=name + "/DequantizeLinear")
            self.graph.insert_before(node, [dq])
            node.replace_input_with(1, dq.outputs[0])
            return
        if blocks.zero is None:  # signed levels; MatMulNBits' default zero point is 8
            u = (q.T.astype(np.int16) + 8).astype(np.uint8).reshape(n, n_blocks, block)
        else:
            u = q.T.reshape(n, n_blocks, block)
        packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)  # [N, blocks, block / 2], low nibble first
        inputs = [node.inputs[0], self.const(name + "_nbits", packed), self.fconst(name + "_scale", scale.T)]
        if blocks.zero is not None:
            z = blocks.zero.T  # [N, blocks]
            if n_blocks % 2:
                z = np.pad(z, ((0, 0), (0, 1)), constant_values=8)
            inputs.append(self.const(name + "_zero_points", (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)))
        mm = ir.node("MatMulNBits", inputs,
                     {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 4},
                     domain="com.microsoft", outputs=[ir.Value(name=node.outputs[0].name + "_nbits")],
                     name=name + "/MatMulNBits")
        self.graph.insert_before(node, [mm])
        out, new = node.outputs[0], mm.outputs[0]
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        out_name, out.name = out.name, out.name + "_replaced"
        new.name, new.type, new.shape = out_name, out.type, out.shape
        self.graph.remove(node, safe=True)
        self.model.opset_imports["com.microsoft"] = 1


# ---- the whole step ----------------------------------------------------------------------------------------------

def quantize_graph(model: ir.Model, cfg: Any, precision: str, options: QuantOptions, stats: Stats) -> dict[str, Any]:
    """Edit ``model`` in memory; return per-layer details for the report."""
    w = Weights(model.graph, cfg)
    rw = Rewriter(model)
    layers = quantize_names([n for n in targets(cfg, options) if n in rw.users], w, rw, precision, options, stats)
    if options.kv_cache != "model":
        layers["kv_cache"] = quant_kv.quantize_cache(model, kv_ranges(stats, w.v_scales))
    return layers


def quantize_names(names: list[str], w: Weights, rw: Rewriter, artifact_precision: str, options: QuantOptions,
                   stats: Stats) -> dict[str, Any]:
    """Quantize the MatMuls ``names`` and write back every tensor their folds edited; per-module details.

    The folds of a decoder layer's modules edit only that layer's tensors (and lm_head's the final norm), so
    calling this once per layer (:mod:`glm_export.stream_quant`) computes what one call over all names does.
    """
    layers: dict[str, Any] = {}
    rows: dict[str, np.ndarray] = {}  # int4: each MatMul's sampled input rows, as the folded graph feeds them
    for name in names:
        st = stats.modules[name]
        amax = st.absmax.numpy().astype(np.float32)
        precision = module_precision(name, artifact_precision, options)
        tie = w.tie(name)
        info: dict[str, Any] = {}
        if precision == "int8" and options.smoothquant_alpha > 0:
            s = smooth_scales(tie(amax), tie(np.abs(w[name]).max(1)), options.smoothquant_alpha)
            w.fold(name, s)
            amax = amax / s
            info["smooth_max_ratio"] = round(float(s.max() / s.min()), 2)
        if precision == "int4":
            rows[name] = st.sample_rows().numpy()
        if precision == "int4" and options.weight_method == "awq":
            absmean = st.absmean.numpy().astype(np.float32)
            s, err, rtn = awq_search(rows[name], w[name], absmean, options.weight_block, partial(tie, reduce=np.mean))
            w.fold(name, s)
            rows[name] = rows[name] / s
            info.update(awq_rel_err=float(f"{err:.3g}"), rtn_rel_err=float(f"{rtn:.3g}"))
        if precision in ("int8", "fp8"):
            info["act_absmax"] = round(float(amax.max()), 4)
        layers[name] = info
    for name in names:  # after all folding: a later module's fold may edit an earlier weight's columns
        precision = module_precision(name, artifact_precision, options)
        if precision == "int4":
            x = rows.pop(name)
            zp = int4_zero_point(options)
            blocks = quant_int4.quantize(w[name], options.weight_block, options.weight_clip, zp,
                                         quant_int4.importance_from_rows(x) if options.weight_clip == "mse" else None)
            layers[name]["int4_rel_err"] = float(f"{int4_output_error(x, w[name], blocks):.3g}")
            rw.int4(name, blocks, options.int4_format)
        elif precision == "int8":
            q8, sc = quant_int8_channel(w[name], 63 if options.int8_reduce_range else 127)
            rw.qdq(name, q8, sc, layers[name]["act_absmax"] / 127.0, np.array(0, np.int8))
        else:
            qf, sc = quant_fp8_channel(w[name])
            rw.qdq(name, qf, sc, layers[name]["act_absmax"] / FP8_MAX, np.array(0, ml_dtypes.float8_e4m3fn))
        w.arrays.pop(name)
    for name, array in w.arrays.items():  # norms and the qkv bias that absorbed scales
        rw.replace(name, array)
    w.arrays.clear()
    return layers


def embed_16bit(model: ir.Model, dtype: str, load: Any = None) -> bool:
    """Store the embedding in the checkpoint's 16-bit type (``dtype``: "BF16" / "F16") and cast the gathered
    rows to float32: the values are the checkpoint's, exactly, at half of float32's bytes (1.24 GB instead of
    2.5 GB for GLM-4-9B's 151552 x 4096 table). ``load`` returns the 16-bit ``ir.Tensor`` (default: converted
    from the graph's float32 initializer). Returns whether the graph changed (not for fp32 checkpoints or
    graphs that are not float32)."""
    target = {"BF16": ir.DataType.BFLOAT16, "F16": ir.DataType.FLOAT16}.get(dtype)
    value = model.graph.initializers.get("embed.weight")
    if target is None or value is None or value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
        return False
    gathers = [n for n in value.uses() if n.node.op_type == "Gather" and n.idx == 0]
    if len(gathers) != len(list(value.uses())):
        return False  # also read by something else (a tied output layer): leave it
    old = value.const_value
    np_type = ml_dtypes.bfloat16 if target == ir.DataType.BFLOAT16 else np.float16

    def convert() -> ir.Tensor:
        return ir.Tensor(old.numpy().astype(np_type), name="embed.weight")

    value.const_value = ir.LazyTensor(load or convert, dtype=target, shape=old.shape, name="embed.weight")
    value.dtype = target
    for use in gathers:
        gather = use.node
        out = gather.outputs[0]
        users = list(out.uses())
        cast = ir.node("Cast", [out], {"to": ir.DataType.FLOAT}, name=gather.name + "/Cast",
                       outputs=[ir.Value(name=out.name + "_float", type=ir.TensorType(ir.DataType.FLOAT),
                                                shape=out.shape)])
        out.dtype = target
        model.graph.insert_after(gather, [cast])
        for user in users:
            user.node.replace_input_with(user.idx, cast.outputs[0])
    return True


def kv_ranges(stats: Stats, v_scales: dict[int, np.ndarray]) -> dict[str, float]:
    """Abs-max of what the graph writes into each cache tensor: V's channels divided by their fold scales."""
    out = dict(stats.kv_absmax)
    for layer, sv in v_scales.items():
        name = f"past_value_{layer}"
        ch = stats.kv_channel_absmax.get(name)
        if ch is None:
            raise QuantizeError("the calibration statistics lack per-channel V ranges; recalibrate")
        out[name] = float((ch.numpy() / sv).max())
    return out


def _tokenizer_dir(model_dir: Path, artifact: Path) -> Path | None:
    for d in (artifact, model_dir):
        if (d / "tokenizer.json").is_file():
            return d
    return None


def rewrite_file(artifact: Path, cfg: Any, precision: str, options: QuantOptions, stats: Stats,
                 source: Path | None = None, embed_dtype: str | None = None) -> dict[str, Any]:
    """Load ``model.onnx`` from ``source`` (default: ``artifact``), quantize, write into ``artifact`` beside it,
    then swap files in (old external data removed). ``build`` passes the export's stage as ``source`` so the
    exported graph survives for a resumed build with other quantization options (:mod:`glm_export.resume`)."""
    from glm_export.export import EXTERNAL_DATA_THRESHOLD, ONNX_DATA, ONNX_FILE

    src = (source or artifact) / ONNX_FILE
    dst = artifact / ONNX_FILE
    model = ir.load(src)
    layers = quantize_graph(model, cfg, precision, options, stats)
    if embed_dtype:
        embed_16bit(model, embed_dtype)
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    stage = artifact / ".quantize"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    external = total > EXTERNAL_DATA_THRESHOLD
    ir.save(model, stage / ONNX_FILE, external_data=ONNX_DATA if external else None)
    del model
    gc.collect()
    (artifact / ONNX_DATA).unlink(missing_ok=True)
    if external:
        os.replace(stage / ONNX_DATA, artifact / ONNX_DATA)
    os.replace(stage / ONNX_FILE, dst)
    shutil.rmtree(stage)
    kv = layers.pop("kv_cache", None)
    return {"layers": layers, "weight_bytes": total, **({"kv_cache": kv} if kv else {})}


def quantize_into(model_dir: Path, artifact: Path, precision: str, options: QuantOptions,
                  source: Path | None = None) -> dict[str, Any]:
    """Quantize ``artifact/model.onnx`` (or ``source/model.onnx`` into ``artifact``); return the report's section."""
    from glm_export.checkpoint import Checkpoint, load_model

    options = resolve_host_options(options)
    check_options(precision, options)
    t0 = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    try:
        records = calibrate.load_records(options.calibration)
        seqs, note = calibrate.tokenize(records, _tokenizer_dir(Path(model_dir), Path(artifact)), cfg.vocab_size,
                                        options.calib_samples, options.calib_seq_len)
    except CalibrationError as e:  # e.g. every sample shorter than MIN_TOKENS once tokenized
        raise QuantizeError(f"calibration set {options.calibration}: {e}") from None
    if "random token ids" in note:
        console.print(f"[yellow]note:[/] {note}")
    model = load_model(ckpt, torch.float32)
    stats = calibrate.collect(model, seqs, note)
    del model
    gc.collect()
    t1 = time.perf_counter()
    console.print(f"quantizing the graph to {precision}")
    edited = rewrite_file(Path(artifact), cfg, precision, options, stats, source, embedding_dtype(ckpt))
    t2 = time.perf_counter()
    report: dict[str, Any] = {
        "precision": precision, "options": asdict(options), "calibration": stats.to_report(),
        "scheme": describe(precision, options), **edited,
        "timings": {"calibrate_s": round(t1 - t0, 2), "rewrite_s": round(t2 - t1, 2)},
    }
    if options.accuracy_samples > 0:
        try:
            report["accuracy"] = accuracy.measure(Path(model_dir), Path(artifact),
                                                  _tokenizer_dir(Path(model_dir), Path(artifact)),
                                                  samples=options.accuracy_samples)
        except Exception as e:  # e.g. an fp16 graph ONNX Runtime CPU cannot run: report it, keep the artifact
            report["accuracy"] = {"status": "skipped", "reason": f"ONNX Runtime CPU could not run the graph: {e}"}
        report["timings"]["accuracy_s"] = round(time.perf_counter() - t2, 2)
    report["markdown"] = markdown(report)
    return report


def embedding_dtype(ckpt: Any) -> str:
    """The safetensors dtype of the checkpoint's embedding ("BF16" for GLM-4-9B)."""
    from glm_export.checkpoint import source_parts

    name = source_parts(ckpt.config, ckpt.layout, "embed.weight")[0][0]
    return ckpt.tensors[name].dtype


def describe(precision: str, options: QuantOptions) -> str:
    kv = ("KV cache in the graph's float type" if options.kv_cache == "model" else
          f"KV cache {options.kv_cache} (static per-tensor scales)")
    return _describe_weights(precision, options).replace("KV cache fp32", kv) + (
        f"; {kv}" if precision == "int4" else "")


def _describe_weights(precision: str, options: QuantOptions) -> str:
    head = {"same": " and lm_head", "float": " (lm_head in the graph's float type)",
            "int8": " (lm_head int8 W8A8, per-channel, SmoothQuant)"}[options.lm_head]
    if precision == "int8":
        sm = f"SmoothQuant alpha {options.smoothquant_alpha}" if options.smoothquant_alpha else "no smoothing"
        bits = "7-bit range (reduce_range)" if options.int8_reduce_range else "full range"
        return (f"W8A8 on qkv/o_proj/gate_up/down{head}: int8 per-channel weights ({bits}), static per-tensor int8 "
                f"activations ({sm}); embedding in the checkpoint's type (bf16 for GLM-4-9B: 16-bit, never widened), "
                f"norms, attention and KV cache fp32")
    if precision == "fp8":
        return (f"FP8 E4M3 on qkv/o_proj/gate_up/down{head}: per-channel weight scales, static per-tensor "
                f"activation scales; embedding, norms, attention and KV cache fp32")
    fmt = "MatMulNBits (accuracy_level 4)" if options.int4_format == "nbits" else "blocked DequantizeLinear"
    kind = "asymmetric (4-bit zero points)" if int4_zero_point(options) else "symmetric"
    clip = ", MSE clip search per block" if options.weight_clip == "mse" else ", abs-max scales"
    return (f"INT4 weight-only on qkv/o_proj/gate_up/down{head}: {kind} blocks of {options.weight_block}, "
            f"{options.weight_method.upper()}{clip}, as {fmt}; activations fp32")


def markdown(report: dict[str, Any]) -> str:
    lines = ["## Quantization", "", report["scheme"] + ".", "",
             f"Calibration: {report['calibration']['note']} ({report['calibration']['tokens']} tokens).", ""]
    acc = report.get("accuracy")
    if acc and acc.get("status") == "skipped":
        lines += [f"Accuracy: skipped: {acc['reason']}", ""]
    elif acc:
        lines += accuracy.markdown_table(acc)
    return "\n".join(lines) + "\n"

