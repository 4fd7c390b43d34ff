"""How far two float32 evaluations of the same GLM-4 may differ: bounds from the arithmetic, not from one CPU.

ONNX Runtime and PyTorch pick their kernels by the CPU they run on (AVX2, AVX-512, VNNI, AMX), so the order in
which a dot product is summed, and with it the last bits of every logit, differ from machine to machine. A
threshold read off one machine's output (``max |diff| < 1e-4`` because 1e-6 was seen) fails on the next one. The
bound here follows the error analysis of floating-point summation instead:

* A dot product of length K summed in any order, in float32 (unit roundoff u = 2^-24), is off by at most
  ``lambda * sqrt(K) * u * sum_i |x_i y_i|`` with probability at least ``1 - 2 exp(-lambda^2 / 2)``
  (Higham and Mary, "A new approach to probabilistic rounding error analysis", SISC 2019; the worst case,
  ``K * u * sum |x_i y_i|``, is never approached by real kernels and would make the check toothless at 9B).
  With lambda = 8 the probability that any of ~10^9 compared values exceeds it is below 10^-5.
* For the random-signed terms of a transformer, ``sum |x_i y_i|`` is about ``sqrt(K)`` times ``|sum x_i y_i|``
  (about ``sqrt(2 / pi) * K`` against ``sqrt(K)`` standard deviations), so a stage of reduction length K adds a
  relative error of about ``lambda * sqrt(K) * u`` to its output. The residual stream carries every stage's
  error to the logits without amplification (RMSNorm rescales value and error alike), so the relative errors
  add over the stages on the way.
* Elementwise functions (exp, rsqrt, sigmoid, sin/cos) are approximated by vectorised kernels to a few ulps;
  ``ELEMENTWISE_ULPS`` per stage covers them.

So ``|logit_a - logit_b| <= max|logit| * u * sum_stages (lambda * sqrt(K_s) + ELEMENTWISE_ULPS)``. The tests
(and ``build``'s validation) compare against this, and a real defect (a wrong rotary base, a missing norm, a
swapped weight) is orders of magnitude above it.
"""

from __future__ import annotations

import math

import numpy as np

from glm_runtime.config import ModelConfig

U32 = 2.0**-24  # unit roundoff of IEEE float32 (half of numpy's float32 eps)
LAMBDA = 8.0
ELEMENTWISE_ULPS = 4.0


def reduction_lengths(cfg: ModelConfig, context: int) -> list[int]:
    """The reduction length of every stage from the embedding to the logits, for attention over ``context``."""
    per_layer = [
        cfg.hidden_size,                    # RMSNorm: mean of squares
        cfg.hidden_size,                    # fused QKV projection
        cfg.head_dim,                       # Q . K
        max(context, 1),                    # softmax sum and P . V
        cfg.num_heads * cfg.head_dim,       # output projection
        cfg.hidden_size,                    # RMSNorm
        cfg.hidden_size,                    # gate/up projection
        cfg.ffn_hidden_size,                # down projection
    ]
    return per_layer * cfg.num_layers + [cfg.hidden_size, cfg.hidden_size]  # final norm, output layer


def fp32_relative_bound(cfg: ModelConfig, context: int) -> float:
    """Bound on |difference| / max|logit| between two float32 evaluations of the model."""
    return U32 * sum(LAMBDA * math.sqrt(k) + ELEMENTWISE_ULPS for k in reduction_lengths(cfg, context))


def fp32_logit_bound(cfg: ModelConfig, context: int, logit_absmax: float) -> float:
    """Bound on the largest |logit difference| between two float32 evaluations (see the module docstring)."""
    return fp32_relative_bound(cfg, context) * max(logit_absmax, 1.0)


def kl_bound(logit_bound: float) -> float:
    """Largest KL(p || q) between softmaxes whose logits differ by at most ``logit_bound`` each.

    KL(p||q) = log E_p[exp(d)] - E_p[d] for d = logit_q - logit_p, and Hoeffding's lemma bounds that by
    (max d - min d)^2 / 8 <= (2 * logit_bound)^2 / 8.
    """
    return logit_bound**2 / 2


def top2_gap_ok(gap: float, logit_bound: float) -> bool:
    """Whether an argmax is decided by the logits rather than by rounding: the top two differ by more than
    twice what each may be off by."""
    return gap > 2 * logit_bound


def half_logit_bound(cfg: ModelConfig, unit_roundoff: float, logit_absmax: float, lam: float = 2.0) -> float:
    """Bound on |logit difference| between a float32 run and a bfloat16 / float16 run of the same weights.

    The half-precision run rounds each stage's inputs (weights and activations) to ``unit_roundoff`` and
    accumulates in float32; two independently rounded operands give each product a relative error of about
    ``sqrt(2) * u``, and over a random-signed sum the output's relative error is of the same size. Stages add up
    as above, with ``lam`` standard deviations of slack (the summation error in float32 is negligible here).
    """
    return max(logit_absmax, 1.0) * unit_roundoff * math.sqrt(2) * lam * len(reduction_lengths(cfg, 1))


def sum_rtol(n: int) -> float:
    """Relative error bound of a float32 sum or mean of ``n`` same-signed terms in any order (plus a few ulps)."""
    return U32 * (LAMBDA * math.sqrt(max(n, 1)) + ELEMENTWISE_ULPS)


def matmul_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Elementwise bound on |float32 x @ w - exact x @ w| for any summation order: the probabilistic bound of the
    module docstring, ``lambda * sqrt(K) * u * (|x| @ |w|)``, plus a few ulps of the result for the scaling."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    k = x64.shape[-1]
    return U32 * (LAMBDA * math.sqrt(k) * (np.abs(x64) @ np.abs(w64)) + ELEMENTWISE_ULPS * np.abs(x64 @ w64))
