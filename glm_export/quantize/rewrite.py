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

from glm_export import accuracy, calibrate
from glm_export.calibrate import CalibrationError, Stats
from glm_export.progress import console
from glm_export.quantize import gptq as quant_gptq
from glm_export.quantize import int4 as quant_int4
from glm_export.quantize import kv as quant_kv
from glm_export.quantize.int4 import CLIP_METHODS, Int4Blocks

QUANTIZED_PRECISIONS = ("fp8", "int8", "int4")
WEIGHT_METHODS = ("rtn", "awq", "gptq", "awq-gptq")  # awq-gptq: AWQ's scales folded first, then GPTQ
BLOCK_SIZES = (32, 64, 128)
WEIGHT_BLOCK_AUTO = 0  # QuantOptions.weight_block: chosen per model by resolve_weight_block
KV_CACHE_CHOICES = quant_kv.KV_CACHE_DTYPES
INT4_FORMATS = ("nbits", "qdq")
LM_HEAD_CHOICES = ("auto", "same", "float", "int8")
# --lm-head auto: int8 output layer in fp8 artifacts, and in int4 artifacts when it is at most this share of the
# weights a decode step reads (GLM-4-9B: 7 %; glm-4-9b-2layer: 60 %; the trained tiny GLM: 96 %). resolve_lm_head.
LM_HEAD_INT8_MAX_SHARE = 0.25
FP8_MAX = 448.0
FP8_ACT_RANGES = ("max", "percentile", "mse")
FP8_PERCENTILE = 99.99  # of |x| over the sampled calibration rows (TensorRT / modelopt's usual percentile)
FP8_MSE_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(17))  # clip ratios 1.0 .. 0.2 of the abs-max
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
    # int4 block size: 32, 64, 128 or WEIGHT_BLOCK_AUTO (resolve_weight_block: 128 on GLM-4-9B, else 32)
    weight_block: int = WEIGHT_BLOCK_AUTO
    # int4 rounding: "rtn", "awq" (AWQ's activation-aware scales), "gptq" (error-compensating, act-order, static
    # block scales; quantize/gptq.py) or "awq-gptq" (AWQ's scales folded, then GPTQ)
    # default awq-gptq: measured on the trained tiny GLM (docs/quantization.md), held-out KL 6.9e-4 vs AWQ's 9.9e-3
    # (block 32) at the same bytes and speed
    weight_method: str = "awq-gptq"
    weight_clip: str = "mse"  # int4 block scales: "mse" (clip-ratio search + least-squares refit) or "none"
    # int4 zero points (asymmetric blocks): None = where the backend takes them (ONNX Runtime's MatMulNBits yes,
    # TensorRT's DequantizeLinear no: it accepts only zero-valued zero points)
    weight_zero_point: bool | None = None
    kv_cache: str = "model"  # "model" (graph dtype) or "int8" (static per-tensor scales, ONNX Runtime; quant_kv.py)
    int4_format: str = "nbits"  # "nbits" (ORT MatMulNBits) or "qdq" (blocked DequantizeLinear, TensorRT)
    # Output layer: "auto" (resolve_lm_head: int8 for int4 artifacts of full-size models, else "same"), "same"
    # (the artifact's precision and method), "float" (left in the graph's float type: fp32 on
    # ONNX Runtime, fp16 for TensorRT) or "int8" (W8A8 per-channel with SmoothQuant, as --precision int8, inside an
    # int4 / fp8 artifact). Its error reaches every logit directly; llama.cpp keeps it at 6 bits in Q4_K_M.
    lm_head: str = "auto"
    # fp8 static activation scale: calibrated abs-max ("max"), a percentile of |x| ("percentile") or the clip
    # ratio of the abs-max with the least E4M3 round-trip squared error on the sampled rows ("mse")
    fp8_act_range: str = "max"
    # int8 weights in [-63, 63] (ORT's reduce_range) or the full [-127, 127]. None: chosen for the build host
    # (resolve_host_options). ONNX Runtime's x86 int8 kernels without an int8 dot product (AVX2 only) add u8*s8
    # pairs in int16 and saturate with full-range weights (measured: 0.3 abs error on a 200-deep dot product, exact
    # with 7 bits); with VNNI / AMX / Arm dotprod they accumulate in int32 and full range halves the weight rounding
    # error at the same speed (docs/quantization.md). TensorRT: always full range.
    int8_reduce_range: bool | None = None
    backend: str = "onnxruntime"  # set by options_for_backend: what the graph must run on
    accuracy_samples: int = 8  # held-out sequences for the accuracy report (0: skip it)
    accuracy_skipped: str = ""  # why the build set accuracy_samples to 0 (said in the report), if it did
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


def head_share(cfg: Any) -> float:
    """The output layer's share of the weights one decode step reads (all but the embedding)."""
    head = cfg.vocab_size * cfg.hidden_size
    layer = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size + \
        3 * cfg.hidden_size * cfg.ffn_hidden_size
    return head / (head + cfg.num_layers * layer)


def resolve_lm_head(options: QuantOptions, cfg: Any, precision: str) -> QuantOptions:
    """``lm_head="auto"`` -> a concrete choice, by measurement (docs/quantization.md, "Output layer"): in int4
    artifacts an int8 output layer halves the held-out KL of the trained tiny GLM (AWQ+GPTQ: 6.9e-4 -> 3.5e-4,
    top-1 0.973 -> 0.981), and costs bytes per token in proportion to the head's share of the weights: +4 % on
    GLM-4-9B, but +37 % on glm-4-9b-2layer (0.60 -> 0.82 GiB per token), whose decoding is bandwidth-bound. So int8
    when the head is at most ``LM_HEAD_INT8_MAX_SHARE`` of the decode bytes, the artifact's own precision
    otherwise. FP8: an int8 head reads the same bytes as an E4M3 one and halves the KL (1.6e-3 -> 7.3e-4, top-1
    0.960 -> 0.968), so always int8. int8 artifacts: "same" (it is int8 already)."""
    if options.lm_head != "auto":
        return options
    int8 = precision == "fp8" or (precision == "int4" and head_share(cfg) <= LM_HEAD_INT8_MAX_SHARE)
    return replace(options, lm_head="int8" if int8 else "same")


def resolve_weight_block(options: QuantOptions, cfg: Any, precision: str) -> QuantOptions:
    """``weight_block`` auto -> 128 when the output layer is int8 (as ``resolve_lm_head`` decides it) and a row of
    the hidden size holds at least 8 blocks of 128, as on GLM-4-9B; 32 otherwise.

    Measured on the trained tiny GLM (docs/quantization.md, "Block size"): with an int8 output layer, block 128
    is within noise of block 32 (held-out perplexity -0.07 % vs +0.19 % of fp32, KL 2.1e-3 vs 1.8e-3) although
    there a block of 128 is a whole row; with an int4 output layer it is not (+2.14 % vs +0.92 %). On GLM-4-9B
    block 128 reads 4.25 instead of 5 bits per weight: decode 5.2 vs 4.7 tok/s and a 6.2 instead of 7.0 GB
    artifact (README, "Full-size GLM-4-9B", with the commands). 128 is also GPTQ's and AWQ's usual group size."""
    if options.weight_block != WEIGHT_BLOCK_AUTO:
        return options
    head = resolve_lm_head(options, cfg, precision).lm_head
    wide = precision == "int4" and head == "int8" and cfg.hidden_size >= 8 * 128
    return replace(options, weight_block=128 if wide else 32)


def uses_gptq(options: QuantOptions) -> bool:
    return options.weight_method in ("gptq", "awq-gptq")


def hessian_modules(cfg: Any, precision: str, options: QuantOptions) -> list[str]:
    """The MatMuls whose input second moments ``X^T X`` calibration must collect: the int4 ones, with GPTQ."""
    if precision != "int4" or not uses_gptq(options):
        return []
    return [n for n in targets(cfg, options) if module_precision(n, precision, options) == "int4"]


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
    if options.weight_block not in (*BLOCK_SIZES, WEIGHT_BLOCK_AUTO):
        raise QuantizeError(f"--weight-block {options.weight_block}: choose auto (the default) or one of "
                            f"{', '.join(map(str, BLOCK_SIZES))}")
    if options.weight_method not in WEIGHT_METHODS:
        raise QuantizeError(f"--weight-method {options.weight_method!r}: choose one of {WEIGHT_METHODS}")
    if options.weight_clip not in CLIP_METHODS:
        raise QuantizeError(f"--weight-clip {options.weight_clip!r}: choose one of {CLIP_METHODS} (mse default)")
    if options.weight_zero_point and options.int4_format == "qdq":
        raise QuantizeError("int4 zero points (--weight-zero-point) do not work on TensorRT: its DequantizeLinear "
                            "accepts only zero-valued zero points. Use --no-weight-zero-point (symmetric blocks) "
                            "for TensorRT backends")
    if options.fp8_act_range not in FP8_ACT_RANGES:
        raise QuantizeError(f"fp8 activation range {options.fp8_act_range!r}: choose one of {FP8_ACT_RANGES}")
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


def fp8_roundtrip(x: np.ndarray, scale: float) -> np.ndarray:
    """What Q/DQ to E4M3 with ``scale`` makes of ``x`` (saturating at +-448, as QuantizeLinear does)."""
    return np.clip(x / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def fp8_act_absmax(rows: np.ndarray, absmax: float, method: str) -> float:
    """The range mapped to E4M3's 448 for one MatMul input (see ``QuantOptions.fp8_act_range``)."""
    if method == "max" or rows.size == 0:
        return absmax
    a = np.abs(rows).reshape(-1)
    if method == "percentile":
        return max(float(np.percentile(a, FP8_PERCENTILE)), 1e-12)
    errs = [float(((fp8_roundtrip(rows, max(r * absmax, 1e-12) / FP8_MAX) - rows) ** 2).sum()) for r in FP8_MSE_GRID]
    return FP8_MSE_GRID[int(np.argmin(errs))] * absmax


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


def sample_columns(n: int, max_cols: int = 4096) -> np.ndarray | None:
    """The fixed subset of output columns that AWQ's search and the int4 error report use on wide layers (lm_head:
    151552 columns); None when the layer is narrow enough to use them all."""
    if n <= max_cols:
        return None
    return np.sort(np.random.default_rng(0).choice(n, max_cols, replace=False))


def int4_output_error(x: np.ndarray, w: np.ndarray, blocks: Int4Blocks, max_cols: int = 4096) -> float:
    """Relative squared error of x @ W_int4 against x @ W on the sampled rows (wide layers: a column subset)."""
    cols = sample_columns(w.shape[1], max_cols)
    if cols is None:
        return int4_error_on(x, w, blocks)
    return int4_error_on(x, w[:, cols], blocks.columns(cols))


def int4_error_on(x: np.ndarray, w: np.ndarray, blocks: Int4Blocks) -> float:
    if x.size == 0:
        return float("nan")
    ref = x @ w
    return float(((x @ blocks.dequant() - ref) ** 2).sum() / max(float((ref**2).sum()), 1e-30))


def smooth_scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), bounded so folding stays well conditioned."""
    s = np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def awq_search(x: np.ndarray, w: np.ndarray, absmean: np.ndarray, block: int, tie: Any) -> tuple[np.ndarray, float,
                                                                                                     float]:
    """AWQ's grid search: s = mean|x|^a; pick the a whose int4(W diag(s)) / s best reproduces x @ W.

    Returns (s, best error, round-to-nearest error) as relative squared errors on the sampled rows.
    Very wide layers (lm_head) are searched on a fixed subset of output columns.

    Each candidate is quantized and dequantized in place in one float32 buffer (the same float operations, in the
    same order per element, as ``quant_int4_blocks`` then ``dequant_int4_blocks`` / s: the levels are small
    integers, exact in float32), so the errors and the choice are those of the plain formulation (test:
    tests/test_quantize_int4.py) without its seven full-size temporaries per candidate.
    """
    cols = sample_columns(w.shape[1])
    if cols is not None:
        w = w[:, cols]
    ref = x @ w
    norm = float((ref**2).sum()) or 1.0
    k, n = w.shape
    pad = -k % block
    buf = np.zeros((k + pad, n), np.float32)  # padded rows stay zero: their blocks' levels are 0
    mag = np.empty_like(buf)
    blocks = buf.reshape(-1, block, n)
    out = np.empty((x.shape[0], n), np.float32)
    best: tuple[float, np.ndarray] | None = None
    rtn = 0.0
    for i in range(AWQ_GRID):
        a = i / AWQ_GRID
        s = tie(np.maximum(absmean, 1e-6) ** a)  # o_proj: equal over the heads sharing a V channel
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        np.multiply(w, s[:, None], out=buf[:k])
        scale = np.maximum(np.abs(blocks, out=mag.reshape(blocks.shape)).max(1), 1e-12).astype(np.float32) / 7.0
        np.divide(blocks, scale[:, None, :], out=blocks)
        np.rint(buf, out=buf)
        np.clip(buf, -8, 7, out=buf)
        np.multiply(blocks, scale[:, None, :], out=blocks)
        np.divide(buf[:k], s[:, None], out=buf[:k])
        np.matmul(x, buf[:k], out=out)
        np.subtract(out, ref, out=out)
        err = float((out**2).sum()) / norm
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
        # name -> columns(selection) -> float32 [in, selected]: where wide weights are read from in chunks
        self.sources: dict[str, Any] = {}
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

    def width(self, name: str) -> int:
        return int(self.graph.initializers[name].const_value.shape[1])

    def columns(self, name: str, cols: slice | np.ndarray) -> np.ndarray:
        """A float32 copy of some output columns of the ``[in, out]`` weight ``name``, without converting the whole
        matrix: from ``sources[name]`` when set (the streamed build reads the checkpoint's rows), else from the
        initializer (memory-mapped external data, or the array)."""
        if name in self.sources:
            return self.sources[name](cols)
        return np.array(self.graph.initializers[name].const_value.numpy()[:, cols], dtype=np.float32)

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

    def fold(self, module: str, s: np.ndarray, weight: bool = True) -> None:
        """Make the input of ``module`` x / s and its weight diag(s) W; the graph computes the same function.
        ``weight=False``: the caller scales the weight itself (chunk by chunk, :func:`quantize_wide`)."""
        cfg = self.cfg
        if weight:
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
    """The graph edits of quantization. ``log`` (when a list) receives one entry per edit, naming the initializers
    it created, so a layer-streamed build can redo a finished layer's edits from the stored tensors without
    recomputing them (:meth:`replay`, :mod:`glm_export.quantize.stream`)."""

    def __init__(self, model: ir.Model) -> None:
        self.model, self.graph = model, model.graph
        self.users = {n.inputs[1].name: n for n in self.graph if n.op_type == "MatMul" and n.inputs[1] is not None
                      and n.inputs[1].is_initializer()}
        # The graph's float type (fp32 for ORT CPU; fp16 / bf16 for TensorRT, which has no fp32 attention): scales
        # and rewritten weights take it, so DequantizeLinear outputs what the MatMul expects.
        first = next(iter(self.users.values()), None)
        self.ftype = first.inputs[1].const_value.dtype.numpy() if first is not None else np.dtype(np.float32)
        self.log: list[dict[str, Any]] | None = None

    def fconst(self, name: str, array: np.ndarray) -> ir.Value:
        return self.const(name, self.float_array(array))

    def float_array(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array).astype(self.ftype)

    def const(self, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
        tensor = array if not isinstance(array, np.ndarray) else ir.Tensor(array, name=name)
        value = ir.Value(name=name, const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def replace(self, name: str, array: np.ndarray) -> None:
        value = self.graph.initializers[name]
        value.const_value = ir.Tensor(np.ascontiguousarray(array).astype(value.const_value.dtype.numpy()), name=name)
        self._record({"op": "replace", "name": name, "tensors": [name]})

    def _record(self, entry: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.append(entry)

    def _drop_weight(self, node: ir.Node) -> ir.Value:
        old = node.inputs[1]
        del self.graph.initializers[old.name]
        return old

    def qdq(self, name: str, wq: np.ndarray, wscale: np.ndarray, ascale: float | None, zero: np.ndarray) -> None:
        """``Q/DQ(x) @ DQ(W)`` (per-channel weight, no weight zero point); ``ascale`` None: weight-only."""
        tensors = {"_quantized": wq, "_scale": self.float_array(wscale)}
        if ascale is not None:
            tensors.update(_act_scale=self.float_array(np.array(ascale)), _act_zp=zero)
        self._qdq_nodes(name, tensors, ascale is not None)

    def _qdq_nodes(self, name: str, tensors: dict[str, Any], act: bool) -> None:
        node = self.users[name]
        self._drop_weight(node)
        values = {k: self.const(name + k, t) for k, t in tensors.items()}  # registered in this order
        wdq = ir.node("DequantizeLinear", [values["_quantized"], values["_scale"]], {"axis": 1},
                      name=name + "/DequantizeLinear")
        nodes = [wdq]
        if act:
            act_in = [values["_act_scale"], values["_act_zp"]]
            q = ir.node("QuantizeLinear", [node.inputs[0], *act_in], name=name + "/act_QuantizeLinear")
            dq = ir.node("DequantizeLinear", [q.outputs[0], *act_in], name=name + "/act_DequantizeLinear")
            nodes = [q, dq, wdq]
            node.replace_input_with(0, dq.outputs[0])
        self.graph.insert_before(node, nodes)
        node.replace_input_with(1, wdq.outputs[0])
        self._record({"op": "qdq", "name": name, "act": act, "tensors": [name + k for k in tensors]})

    def int4(self, name: str, blocks: Int4Blocks, fmt: str) -> None:
        """Blocked int4: ``MatMulNBits`` (ORT) or ``MatMul(x, DQ(W_int4, block_size))`` (TensorRT, symmetric)."""
        self._int4_nodes(name, int4_tensors(blocks, fmt, self.ftype), fmt, blocks.k, blocks.scale.shape[1],
                         blocks.block)

    def _int4_nodes(self, name: str, tensors: dict[str, Any], fmt: str, k: int, n: int, block: int) -> None:
        node = self.users[name]
        self._drop_weight(node)
        self._record({"op": "int4", "name": name, "fmt": fmt, "k": k, "n": n, "block": block,
                      "tensors": [name + s for s in tensors]})
        if fmt == "qdq":
            qv = self.const(name + "_quantized", tensors["_quantized"])
            dq = ir.node("DequantizeLinear", [qv, self.const(name + "_scale", tensors["_scale"])],
                         {"axis": 0, "block_size": block}, name=name + "/DequantizeLinear")
            self.graph.insert_before(node, [dq])
            node.replace_input_with(1, dq.outputs[0])
            return
        inputs = [node.inputs[0], *(self.const(name + s, t) for s, t in tensors.items())]
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

    def replay(self, entry: dict[str, Any], tensors: dict[str, ir.TensorProtocol]) -> None:
        """Redo one logged edit with its stored tensors (``tensors``: initializer name -> tensor)."""
        name, op = entry["name"], entry["op"]
        if op == "replace":
            self.graph.initializers[name].const_value = tensors[name]
            self._record(entry)
            return
        by_suffix = {t[len(name):]: tensors[t] for t in entry["tensors"]}
        if op == "qdq":
            self._qdq_nodes(name, by_suffix, bool(entry["act"]))
        elif op == "int4":
            self._int4_nodes(name, by_suffix, entry["fmt"], entry["k"], entry["n"], entry["block"])
        else:
            raise ValueError(f"unknown logged edit {op!r}")


def int4_tensors(blocks: Int4Blocks, fmt: str, ftype: Any) -> dict[str, np.ndarray]:
    """The initializers (by name suffix) of a blocked int4 MatMul: MatMulNBits' packed ``[N, blocks, block / 2]``
    nibbles, ``[N, blocks]`` scales and packed zero points (``"nbits"``), or the int4 ``[K, N]`` weight and
    ``[blocks, N]`` scales of a blocked DequantizeLinear (``"qdq"``). Output column j of the weight is row j of the
    nbits tensors and column j of the qdq ones (:data:`INT4_COLUMN_AXIS`)."""
    q, scale, k = blocks.q, blocks.scale, blocks.k
    n_blocks, n = scale.shape
    block = blocks.block
    if fmt == "qdq":
        if blocks.zero is not None:
            raise QuantizeError("the blocked DequantizeLinear form (TensorRT) takes symmetric int4 only")
        return {"_quantized": q[:k].astype(ml_dtypes.int4), "_scale": np.ascontiguousarray(scale).astype(ftype)}
    if blocks.zero is None:  # signed levels; MatMulNBits' default zero point is 8
        u = (q.T.astype(np.int16) + 8).astype(np.uint8).reshape(n, n_blocks, block)
    else:
        u = q.T.reshape(n, n_blocks, block)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)  # [N, blocks, block / 2], low nibble first
    tensors = {"_nbits": packed, "_scale": np.ascontiguousarray(scale.T).astype(ftype)}
    if blocks.zero is not None:
        z = blocks.zero.T  # [N, blocks]
        if n_blocks % 2:
            z = np.pad(z, ((0, 0), (0, 1)), constant_values=8)
        tensors["_zero_points"] = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return tensors


INT4_COLUMN_AXIS = {"nbits": 0, "qdq": 1}


# ---- the whole step ----------------------------------------------------------------------------------------------

def quantize_graph(model: ir.Model, cfg: Any, precision: str, options: QuantOptions, stats: Stats) -> dict[str, Any]:
    """Edit ``model`` in memory; return per-layer details for the report."""
    options = resolve_weight_block(options, cfg, precision)  # callers that pass the options as given
    w = Weights(model.graph, cfg)
    rw = Rewriter(model)
    layers = quantize_names([n for n in targets(cfg, options) if n in rw.users], w, rw, precision, options, stats)
    if options.kv_cache != "model":
        layers["kv_cache"] = quant_kv.quantize_cache(model, kv_ranges(stats, w.v_scales))
    return layers


def quantize_names(names: list[str], w: Weights, rw: Rewriter, artifact_precision: str, options: QuantOptions,
                   stats: Stats, consume: bool = False) -> dict[str, Any]:
    """Quantize the MatMuls ``names`` and write back every tensor their folds edited; per-module details.

    The folds of a decoder layer's modules edit only that layer's tensors (and lm_head's the final norm), so
    calling this once per layer (:mod:`glm_export.quantize.stream`) computes what one call over all names does.
    ``consume``: GPTQ may take the statistics' ``X^T X`` buffers instead of copying them (the streamed path, which
    drops them after the layer anyway); without it ``stats`` can be quantized again.
    """
    layers: dict[str, Any] = {}
    rows: dict[str, np.ndarray] = {}  # int4: each MatMul's sampled input rows, as the folded graph feeds them
    hessians: dict[str, np.ndarray] = {}  # GPTQ: each MatMul's E[x x^T], of the folded input
    wide = [n for n in names if is_wide(n, w)]
    names = [n for n in names if n not in wide]
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
        if precision == "int4" and uses_gptq(options):
            hessians[name] = (st.take_hessian() if consume else st.hessian()).numpy()  # a buffer of its own
        if precision == "int4" and options.weight_method in ("awq", "awq-gptq"):
            absmean = st.absmean.numpy().astype(np.float32)
            s, err, rtn = awq_search(rows[name], w[name], absmean, options.weight_block, partial(tie, reduce=np.mean))
            w.fold(name, s)
            rows[name] = rows[name] / s
            if name in hessians:  # the folded input is x / s (in place: the same quotients, no second H)
                np.divide(hessians[name], np.outer(s, s), out=hessians[name])
            info.update(awq_rel_err=float(f"{err:.3g}"), rtn_rel_err=float(f"{rtn:.3g}"))
        if precision == "int8":
            info["act_absmax"] = round(float(amax.max()), 4)
        if precision == "fp8":
            info["act_absmax"] = round(float(amax.max()), 4)
            if options.fp8_act_range != "max":
                rng = fp8_act_absmax(st.sample_rows().numpy(), float(amax.max()), options.fp8_act_range)
                info["act_range"] = float(f"{rng:.6g}")
        layers[name] = info
    for name in names:  # after all folding: a later module's fold may edit an earlier weight's columns
        precision = module_precision(name, artifact_precision, options)
        if precision == "int4":
            x = rows.pop(name)
            zp = int4_zero_point(options)
            if name in hessians:
                try:
                    blocks, gi = quant_gptq.quantize(w[name], hessians.pop(name), options.weight_block,
                                                     options.weight_clip, zp, own_h=True)
                except quant_gptq.GPTQError as e:
                    raise QuantizeError(f"{name}: {e}") from None
                layers[name].update(gptq_proxy_err=float(f"{gi.proxy_err:.3g}"),
                                    gptq_rtn_proxy_err=float(f"{gi.rtn_proxy_err:.3g}"), gptq_damp=gi.damp,
                                    gptq_dead_inputs=gi.dead)
            else:
                blocks = quant_int4.quantize(w[name], options.weight_block, options.weight_clip, zp,
                                             quant_int4.importance_from_rows(x) if options.weight_clip == "mse"
                                             else None)
            layers[name]["int4_rel_err"] = float(f"{int4_output_error(x, w[name], blocks):.3g}")
            rw.int4(name, blocks, options.int4_format)
        elif precision == "int8":
            q8, sc = quant_int8_channel(w[name], 63 if options.int8_reduce_range else 127)
            rw.qdq(name, q8, sc, layers[name]["act_absmax"] / 127.0, np.array(0, np.int8))
        else:
            qf, sc = quant_fp8_channel(w[name])
            rng = layers[name].get("act_range", layers[name]["act_absmax"])
            rw.qdq(name, qf, sc, rng / FP8_MAX, np.array(0, ml_dtypes.float8_e4m3fn))
        w.arrays.pop(name)
    for name in wide:  # lm_head: it folds only into the final norm, and nothing folds into it
        layers[name] = quantize_wide(name, w, rw, module_precision(name, artifact_precision, options), options,
                                     stats.modules[name], consume=consume)
    for name, array in w.arrays.items():  # norms and the qkv bias that absorbed scales
        rw.replace(name, array)
    w.arrays.clear()
    return layers


WIDE_COLUMNS = 65536  # output layers wider than this are quantized in column chunks (GLM-4's lm_head: 151552)
CHUNK_BYTES = 64 << 20  # float32 bytes of one chunk of columns (a few temporaries of this size at a time)


def is_wide(name: str, w: Weights) -> bool:
    return name in w.norms and not name.startswith("layers.") and w.width(name) > WIDE_COLUMNS


def chunk_columns(k: int) -> int:
    """Columns per chunk: ``CHUNK_BYTES`` of float32, a multiple of the int4 clip search's own column step."""
    step = max(1, quant_int4.CHUNK_ELEMENTS // (k + (-k % 32)))
    return max(step, CHUNK_BYTES // (4 * k) // step * step)


def quantize_wide(name: str, w: Weights, rw: Rewriter, precision: str, options: QuantOptions, st: Any,
                  chunk: int | None = None, consume: bool = False) -> dict[str, Any]:
    """:func:`quantize_names` for one very wide MatMul (the 151552 x 4096 output layer), a chunk of output
    columns at a time: int8 / fp8 scales are per output column and int4 blocks run down a column, so columns are
    independent and the result is the whole-matrix result, bit for bit (tests/test_quantize_wide.py). The
    whole-matrix code held the weight in float32 plus two or three float32 temporaries of the same size (7.8 GB
    measured on GLM-4-9B int8); here one float32 chunk and the quantized output."""
    k, n = w.graph.initializers[name].const_value.shape
    chunk = chunk or chunk_columns(k)
    spans = [slice(c, min(c + chunk, n)) for c in range(0, n, chunk)]
    amax = st.absmax.numpy().astype(np.float32)
    info: dict[str, Any] = {}
    s: np.ndarray | None = None
    x = None
    if precision == "int8" and options.smoothquant_alpha > 0:
        wmax = np.zeros(k, np.float32)
        for sp in spans:
            np.maximum(wmax, np.abs(w.columns(name, sp)).max(1), out=wmax)
        s = smooth_scales(amax, wmax, options.smoothquant_alpha)
        w.fold(name, s, weight=False)
        amax = amax / s
        info["smooth_max_ratio"] = round(float(s.max() / s.min()), 2)
    h: np.ndarray | None = None  # GPTQ's E[x x^T] of the (folded) input: shared by every column chunk
    if precision == "int4":
        x = st.sample_rows().numpy()
        if uses_gptq(options):
            h = (st.take_hessian() if consume else st.hessian()).numpy()
    if precision == "int4" and options.weight_method in ("awq", "awq-gptq"):
        cols = sample_columns(n)
        s, err, rtn = awq_search(x, w.columns(name, slice(None) if cols is None else cols),
                                 st.absmean.numpy().astype(np.float32), options.weight_block, lambda v: v)
        w.fold(name, s, weight=False)
        x = x / s
        if h is not None:
            h = h / np.outer(s, s)
        info.update(awq_rel_err=float(f"{err:.3g}"), rtn_rel_err=float(f"{rtn:.3g}"))
    if precision in ("int8", "fp8"):
        info["act_absmax"] = round(float(amax.max()), 4)
    if precision == "fp8" and options.fp8_act_range != "max":
        rng = fp8_act_absmax(st.sample_rows().numpy(), float(amax.max()), options.fp8_act_range)
        info["act_range"] = float(f"{rng:.6g}")

    def folded(cols: slice | np.ndarray) -> np.ndarray:
        c = w.columns(name, cols)
        if s is not None:
            np.multiply(c, s[:, None], out=c)
        return c

    if precision == "int4":
        assert x is not None
        zp = int4_zero_point(options)
        imp = quant_int4.importance_from_rows(x) if options.weight_clip == "mse" else None
        fmt, axis = options.int4_format, INT4_COLUMN_AXIS[options.int4_format]
        cols = sample_columns(n)
        assert cols is not None  # wide means wider than the error's column sample
        out: dict[str, np.ndarray] = {}
        sampled: list[Int4Blocks] = []
        block = options.weight_block
        proxy: list[tuple[int, float, float]] = []
        for sp in spans:  # quantize and pack each chunk straight into the initializers
            if h is not None:  # GPTQ's updates run along the inputs, per output column: chunks are independent
                try:
                    b, gi = quant_gptq.quantize(folded(sp), h, block, options.weight_clip, zp)
                except quant_gptq.GPTQError as e:
                    raise QuantizeError(f"{name}: {e}") from None
                proxy.append((sp.stop - sp.start, gi.proxy_err, gi.rtn_proxy_err))
                info.update(gptq_damp=gi.damp, gptq_dead_inputs=gi.dead)
            else:
                b = quant_int4.quantize(folded(sp), block, options.weight_clip, zp, imp)
            for suffix, t in int4_tensors(b, fmt, rw.ftype).items():
                if suffix not in out:
                    shape = list(t.shape)
                    shape[axis] = n
                    out[suffix] = np.empty(shape, t.dtype)
                out[suffix][(slice(None),) * axis + (sp,)] = t
            sampled.append(b.columns(cols[(cols >= sp.start) & (cols < sp.stop)] - sp.start))
        picked = Int4Blocks(np.concatenate([b.q for b in sampled], 1), np.concatenate([b.scale for b in sampled], 1),
                            None if not zp else np.concatenate([b.zero for b in sampled], 1), k)  # type: ignore[misc]
        info["int4_rel_err"] = float(f"{int4_error_on(x, folded(cols), picked):.3g}")
        if proxy:  # the per-chunk relative errors, averaged over columns (each chunk has its own denominator)
            info["gptq_proxy_err"] = float(f"{sum(c * e for c, e, _ in proxy) / n:.3g}")
            info["gptq_rtn_proxy_err"] = float(f"{sum(c * r for c, _, r in proxy) / n:.3g}")
        rw._int4_nodes(name, out, fmt, k, n, block)
        return info
    qdtype = np.int8 if precision == "int8" else ml_dtypes.float8_e4m3fn
    q, scale = np.empty((k, n), qdtype), np.empty(n, np.float32)
    for sp in spans:
        if precision == "int8":
            q[:, sp], scale[sp] = quant_int8_channel(folded(sp), 63 if options.int8_reduce_range else 127)
        else:
            q[:, sp], scale[sp] = quant_fp8_channel(folded(sp))
    if precision == "int8":
        rw.qdq(name, q, scale, info["act_absmax"] / 127.0, np.array(0, np.int8))
    else:
        rng = info.get("act_range", info["act_absmax"])
        rw.qdq(name, q, scale, rng / FP8_MAX, np.array(0, ml_dtypes.float8_e4m3fn))
    return info


_DTYPES_16 = {"BF16": ir.DataType.BFLOAT16, "F16": ir.DataType.FLOAT16}  # safetensors dtype -> graph dtype


def _float_initializer(model: ir.Model, name: str) -> ir.Value | None:
    value = model.graph.initializers.get(name)
    if value is None or value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
        return None
    return value


def _store_16bit(value: ir.Value, target: ir.DataType, load: Any = None) -> None:
    """Make a float32 initializer ``target`` (bf16 / fp16), lazily: ``load`` returns the 16-bit tensor (the
    checkpoint's own values), else the float32 one is converted when the graph is written."""
    old = value.const_value
    np_type = ml_dtypes.bfloat16 if target == ir.DataType.BFLOAT16 else np.float16

    def convert() -> ir.Tensor:
        return ir.Tensor(old.numpy().astype(np_type), name=value.name)

    value.const_value = ir.LazyTensor(load or convert, dtype=target, shape=old.shape, name=value.name)
    value.dtype = target


def embed_16bit(model: ir.Model, dtype: str, load: Any = None) -> bool:
    """Store the embedding in the checkpoint's 16-bit type (``dtype``: "BF16" / "F16") and cast the gathered
    rows to float32: the values are the checkpoint's, exactly, at half of float32's bytes (1.24 GB instead of
    2.5 GB for GLM-4-9B's 151552 x 4096 table). ``load`` returns the 16-bit ``ir.Tensor`` (default: converted
    from the graph's float32 initializer). Returns whether the graph changed (not for fp32 checkpoints or
    graphs that are not float32)."""
    target = _DTYPES_16.get(dtype)
    value = _float_initializer(model, "embed.weight")
    if target is None or value is None:
        return False
    gathers = [n for n in value.uses() if n.node.op_type == "Gather" and n.idx == 0]
    if len(gathers) != len(list(value.uses())):
        return False  # also read by something else (a tied output layer): leave it
    _store_16bit(value, target, load)
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


def head_16bit(model: ir.Model, dtype: str, load: Any = None) -> bool:
    """``--lm-head float`` in a float32 graph (ONNX Runtime): store the output layer in the checkpoint's 16-bit type
    (``dtype``: "BF16" / "F16") with a Cast to float32 in front of its MatMul, as :func:`embed_16bit` does for the
    embedding: a quantized artifact never carries the 151552 x 4096 output layer in float32 (issue 13). The values
    are the checkpoint's, exactly. ONNX Runtime CPU widens it once at session load (it folds the Cast; measured),
    so its runtime still holds float32 for this choice: ``--lm-head int8`` is the one that saves memory there.
    ``load`` returns the 16-bit ``[in, out]`` ``ir.Tensor`` (default: converted from the float32 initializer)."""
    target = _DTYPES_16.get(dtype)
    value = _float_initializer(model, "lm_head.weight")
    if target is None or value is None:
        return False
    uses = list(value.uses())
    if not uses or any(u.node.op_type != "MatMul" or u.idx != 1 for u in uses):
        return False
    shape = value.const_value.shape
    _store_16bit(value, target, load)
    cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name="lm_head.weight/Cast",
                   outputs=[ir.Value(name="lm_head.weight_float", type=ir.TensorType(ir.DataType.FLOAT),
                                     shape=shape)])
    model.graph.insert_before(uses[0].node, [cast])
    for use in uses:
        use.node.replace_input_with(use.idx, cast.outputs[0])
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
        if options.lm_head == "float":
            head_16bit(model, embed_dtype)
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    stage = artifact / ".quantize"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    external = total > EXTERNAL_DATA_THRESHOLD
    if not external:  # tensors the rewrite left alone may still point into the source's data file: inline them
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
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
    options = resolve_weight_block(resolve_lm_head(options, cfg, precision), cfg, precision)
    try:
        records = calibrate.load_records(options.calibration)
        seqs, note = calibrate.tokenize(records, _tokenizer_dir(Path(model_dir), Path(artifact)), cfg.vocab_size,
                                        options.calib_samples, options.calib_seq_len)
    except CalibrationError as e:  # e.g. every sample shorter than MIN_TOKENS once tokenized
        raise QuantizeError(f"calibration set {options.calibration}: {e}") from None
    if "random token ids" in note:
        console.print(f"[yellow]note:[/] {note}")
    model = load_model(ckpt, torch.float32)
    stats = calibrate.collect(model, seqs, note, hessian=hessian_modules(cfg, precision, options))
    t_cal = time.perf_counter()
    ref = None
    if options.accuracy_samples > 0:  # while the model is loaded: the accuracy step does not load it again
        ref = accuracy.reference(model, cfg, _tokenizer_dir(Path(model_dir), Path(artifact)),
                                 samples=options.accuracy_samples)
    del model
    gc.collect()
    t1 = time.perf_counter()
    console.print(f"quantizing the graph to {precision}")
    edited = rewrite_file(Path(artifact), cfg, precision, options, stats, source, embedding_dtype(ckpt))
    t2 = time.perf_counter()
    report: dict[str, Any] = {
        "precision": precision, "options": asdict(options), "calibration": stats.to_report(),
        "scheme": describe(precision, options), **edited,
        "timings": {"calibrate_s": round(t_cal - t0, 2), "rewrite_s": round(t2 - t1, 2)},
    }
    if options.accuracy_samples > 0:
        try:
            report["accuracy"] = accuracy.measure(Path(model_dir), Path(artifact),
                                                  _tokenizer_dir(Path(model_dir), Path(artifact)),
                                                  samples=options.accuracy_samples, ref=ref)
        except Exception as e:  # e.g. an fp16 graph ONNX Runtime CPU cannot run: report it, keep the artifact
            report["accuracy"] = {"status": "skipped", "reason": f"ONNX Runtime CPU could not run the graph: {e}"}
        report["timings"]["accuracy_s"] = round(time.perf_counter() - t2 + t1 - t_cal, 2)
        del ref
    elif options.accuracy_skipped:
        report["accuracy"] = {"status": "skipped", "reason": options.accuracy_skipped}
    report["markdown"] = markdown(report)
    return report


def embedding_dtype(ckpt: Any, canonical: str = "embed.weight") -> str:
    """The safetensors dtype of the checkpoint's embedding ("BF16" for GLM-4-9B), or of another tensor."""
    from glm_export.checkpoint import source_parts

    name = source_parts(ckpt.config, ckpt.layout, canonical)[0][0]
    return ckpt.tensors[name].dtype


def describe(precision: str, options: QuantOptions) -> str:
    kv = ("KV cache in the graph's float type" if options.kv_cache == "model" else
          f"KV cache {options.kv_cache} (static per-tensor scales)")
    return _describe_weights(precision, options).replace("KV cache fp32", kv) + (
        f"; {kv}" if precision == "int4" else "")


def _describe_weights(precision: str, options: QuantOptions) -> str:
    head = {"same": " and lm_head", "float": " (lm_head unquantized: the checkpoint's 16-bit type, cast to the "
                                             "graph's float type)",
            "int8": " (lm_head int8 W8A8, per-channel, SmoothQuant)", "auto": " and lm_head (auto)"}[options.lm_head]
    if precision == "int8":
        sm = f"SmoothQuant alpha {options.smoothquant_alpha}" if options.smoothquant_alpha else "no smoothing"
        bits = "7-bit range (reduce_range)" if options.int8_reduce_range else "full range"
        return (f"W8A8 on qkv/o_proj/gate_up/down{head}: int8 per-channel weights ({bits}), static per-tensor int8 "
                f"activations ({sm}); embedding in the checkpoint's type (bf16 for GLM-4-9B: 16-bit, never widened), "
                f"norms, attention and KV cache fp32")
    if precision == "fp8":
        return (f"FP8 E4M3 on qkv/o_proj/gate_up/down{head}: per-channel weight scales, static per-tensor "
                f"activation scales; embedding in the checkpoint's type (16-bit), norms, attention and KV cache in "
                f"the graph's float type")
    fmt = "MatMulNBits (accuracy_level 4)" if options.int4_format == "nbits" else "blocked DequantizeLinear"
    kind = "asymmetric (4-bit zero points)" if int4_zero_point(options) else "symmetric"
    clip = ", MSE clip search per block" if options.weight_clip == "mse" else ", abs-max scales"
    method = {"gptq": "GPTQ (act-order, static block scales)",
              "awq-gptq": "AWQ scales then GPTQ (act-order, static block scales)"}.get(
                  options.weight_method, options.weight_method.upper())
    return (f"INT4 weight-only on qkv/o_proj/gate_up/down{head}: {kind} blocks of {options.weight_block}, "
            f"{method}{clip}, as {fmt}; activations fp32")


def markdown(report: dict[str, Any]) -> str:
    lines = ["## Quantization", "", report["scheme"] + ".", "",
             f"Calibration: {report['calibration']['note']} ({report['calibration']['tokens']} tokens).", ""]
    acc = report.get("accuracy")
    if acc and acc.get("status") == "skipped":
        lines += [f"Accuracy: skipped: {acc['reason']}", ""]
    elif acc:
        lines += accuracy.markdown_table(acc)
    return "\n".join(lines) + "\n"

