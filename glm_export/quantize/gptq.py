"""GPTQ for the int4 block form: error-compensating rounding with activation order and static block scales.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
quantizes a weight matrix one input channel at a time and spreads each channel's rounding error over the
channels not quantized yet, so that the *output* ``X W`` moves as little as possible. With ``H = X^T X`` (the
input's second moments from calibration) the update after rounding channel ``j`` is
``W[j+1:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}``, all from the upper Cholesky factor of ``H^-1``.
What this module does, as the paper and GPTQModel / AutoGPTQ (``gptq.py``, ``fasterquant``) do:

- **dampening**: ``H + damp * mean(diag H) * I`` (``damp`` 0.01); if the Cholesky factorisation still fails the
  dampening grows (x2, as GPTQModel's ``damp_auto_increment`` does) until it succeeds;
- **dead inputs** (``H_jj == 0``, a channel calibration never excited): ``H_jj = 1`` and the weight row zeroed
  (GPTQModel: ``W[:, dead] = 0``; nothing ever multiplies them);
- **activation order** (``act_order``, GPTQModel's ``desc_act``): channels in descending ``H_jj``, so the
  loudest inputs are rounded first, while many other channels are still free to absorb their error;
- **lazy batch updates**: the rank-``batch`` update of all later channels once per batch of 128 channels
  (the paper's Step 2), the per-channel updates inside the batch only;
- **static groups** (GPTQModel / AutoGPTQ ``static_groups=True``): the int4 form here (MatMulNBits and
  TensorRT's blocked DequantizeLinear) has one scale per *contiguous* block of the original channel order,
  and no ``g_idx`` (MatMulNBits has an optional one, TensorRT none). With act-order a block's channels are
  visited out of order, so its scale cannot be fitted when its first channel comes up (GPTQ's default
  ``groupsize`` path without static groups). Every block's scale (and zero point) is therefore computed
  *before* the pass, from the unmodified weights, with the project's per-block MSE clip search weighted by
  ``diag(H)`` (:func:`glm_export.quantize.int4.quantize`); the pass then only chooses levels on those fixed
  grids. The result is exactly on the int4 grid of the written scales, in the original channel order.

Rows of ``W^T`` (output channels) are independent given ``H^-1``, so they are processed in chunks: memory is
``H`` and its factor (``in^2`` floats each; 750 MB for GLM-4-9B's 13696-wide down projection) plus one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glm_export.quantize import int4 as quant_int4
from glm_export.quantize.int4 import Int4Blocks

DAMP = 0.01  # of mean(diag H): the paper's and AutoGPTQ's default
BATCH = 128  # lazy-update width (the paper's B)
ROW_CHUNK_ELEMENTS = 1 << 24  # output channels per pass: 64 MB of float32 weights at a time


class GPTQError(ValueError):
    """H cannot be factorised even with heavy dampening (e.g. NaNs in the calibration)."""


@dataclass
class GPTQInfo:
    damp: float  # the dampening that was used, relative to mean(diag H)
    dead: int  # input channels calibration never excited
    proxy_err: float  # tr((W - Q) H (W - Q)^T) / tr(W H W^T): the output error the pass minimised
    rtn_proxy_err: float  # the same for the static grid's round-to-nearest (before GPTQ's updates)


def hinv_factor(h: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + d I)^-1`` (float32), and the relative dampening that worked."""
    mean_diag = float(torch.diagonal(h).mean())
    if not np.isfinite(mean_diag):
        raise GPTQError("the calibration Hessian has non-finite entries: the calibration run overflowed")
    d = damp
    for _ in range(12):
        hd = h.clone()
        hd.diagonal().add_(d * max(mean_diag, 1e-30))
        chol, info = torch.linalg.cholesky_ex(hd)  # float32, as GPTQModel (float64 would double 1.5 GB)
        del hd
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            up, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(up).all()):
                return up, d
        d *= 2
    raise GPTQError(f"H is not positive definite even with dampening {d / 2:g} x mean(diag): recalibrate with "
                    f"more samples")


def quantize(w: np.ndarray, h: np.ndarray, block: int, clip: str = "mse", zero_point: bool = False,
             act_order: bool = True, damp: float = DAMP, batch: int = BATCH) -> tuple[Int4Blocks, GPTQInfo]:
    """GPTQ of ``w`` [in, out] against ``h`` = X^T X [in, in] (any positive scale: only ratios matter).

    Returns blocks on the static per-block grids (see the module docstring) and what the pass did.
    """
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"H is {h.shape}, the weight has {k} input channels")
    threads = torch.get_num_threads()
    try:
        return _gptq(w, h, block, clip, zero_point, act_order, damp, batch, threads)
    finally:
        torch.set_num_threads(threads)


def _gptq(w: np.ndarray, h_np: np.ndarray, block: int, clip: str, zero_point: bool, act_order: bool, damp: float,
          batch: int, threads: int = 1) -> tuple[Int4Blocks, GPTQInfo]:
    k, n = w.shape
    h = torch.from_numpy(np.array(h_np, dtype=np.float32))
    diag = torch.diagonal(h).clone()
    dead = diag <= 0
    h.diagonal()[dead] = 1.0
    w0 = np.array(w, dtype=np.float32)
    w0[dead.numpy()] = 0.0
    # static groups: every block's grid from the unmodified weights, weighted by the input's second moments
    grids = quant_int4.quantize(w0, block, clip, zero_point, diag.clamp_min(0).numpy() if clip == "mse" else None)
    scale = torch.from_numpy(grids.scale)  # [blocks, out]
    zero = None if grids.zero is None else torch.from_numpy(grids.zero.astype(np.float32))
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(k)
    hp = h[perm][:, perm]
    up, used = hinv_factor(hp, damp)
    del hp
    group = perm // block  # the (original) block of each permuted channel
    lo, hi = (0.0, 15.0) if zero_point else (-8.0, 7.0)
    levels = np.empty((k, n), np.float32)  # q - zero, original channel order
    step = max(1, ROW_CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wt = torch.from_numpy(np.ascontiguousarray(w0[:, r0:r1].T))[:, perm].contiguous()  # [rows, in] permuted
        s_all = scale[:, r0:r1].T.contiguous()  # [rows, blocks]
        z_all = None if zero is None else zero[:, r0:r1].T.contiguous()
        lv = torch.empty_like(wt)
        for i1 in range(0, k, batch):
            i2 = min(k, i1 + batch)
            w1 = wt[:, i1:i2].clone()
            err1 = torch.empty_like(w1)
            hinv1 = up[i1:i2, i1:i2]
            # The column loop is thousands of small elementwise ops: one thread (OpenMP's fork/join per op cost
            # 3.4x the CPU time at 2 threads on a 4096 x 4096 weight, measured); the lazy-batch GEMM below gets
            # every thread. Elementwise results do not depend on the thread count.
            torch.set_num_threads(1)
            for j in range(i2 - i1):
                g = int(group[i1 + j])
                s = s_all[:, g]
                col = w1[:, j]
                if z_all is None:
                    q = torch.clamp(torch.round(col / s), lo, hi)
                else:
                    z = z_all[:, g]
                    q = torch.clamp(torch.round(col / s) + z, lo, hi) - z
                lv[:, i1 + j] = q
                e = (col - q * s) / hinv1[j, j]
                w1[:, j:] -= e[:, None] * hinv1[j, j:][None, :]
                err1[:, j] = e
            torch.set_num_threads(threads)
            if i2 < k:
                wt[:, i2:] -= err1 @ up[i1:i2, i2:]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        levels[:, r0:r1] = lv[:, inv].T.numpy()
    blocks = _blocks(levels, grids)
    wq = blocks.dequant()
    return blocks, GPTQInfo(damp=used, dead=int(dead.sum()), proxy_err=_proxy(w0, wq, h),
                            rtn_proxy_err=_proxy(w0, grids.dequant(), h))


def _blocks(levels: np.ndarray, grids: Int4Blocks) -> Int4Blocks:
    """Int4Blocks with the pass's levels on the static grids (padding rows keep the grid's own levels)."""
    k = levels.shape[0]
    q = grids.q.copy()
    if grids.zero is None:
        q[:k] = levels.astype(np.int8)
    else:
        z = np.repeat(grids.zero, grids.block, axis=0)[:k].astype(np.float32)
        q[:k] = (levels + z).astype(np.uint8)
    return Int4Blocks(q, grids.scale, grids.zero, grids.k)


def _proxy(w: np.ndarray, wq: np.ndarray, h: torch.Tensor) -> float:
    """Relative output error tr(D^T H D) / tr(W^T H W) (H already has the dead channels' ones)."""
    num = den = 0.0
    step = max(1, ROW_CHUNK_ELEMENTS // max(w.shape[0], 1))
    for c0 in range(0, w.shape[1], step):  # column chunks: lm_head's [4096, 151552] would be 2.5 GB at once
        d = torch.from_numpy(np.ascontiguousarray(wq[:, c0:c0 + step] - w[:, c0:c0 + step]))
        wt = torch.from_numpy(np.ascontiguousarray(w[:, c0:c0 + step]))
        num += float((d * (h @ d)).sum())
        den += float((wt * (h @ wt)).sum())
    return num / max(den, 1e-30)
