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
PROXY_COLUMNS = 256  # output channels the reported proxy errors are measured on (see _proxy_columns)


class GPTQError(ValueError):
    """H cannot be factorised even with heavy dampening (e.g. NaNs in the calibration)."""


@dataclass
class GPTQInfo:
    damp: float  # the dampening that was used, relative to mean(diag H)
    dead: int  # input channels calibration never excited
    proxy_err: float  # tr((W - Q) H (W - Q)^T) / tr(W H W^T): the output error the pass minimised
    rtn_proxy_err: float  # the same for the static grid's round-to-nearest (before GPTQ's updates)


def hinv_factor(h: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + d I)^-1`` (``U^T U = (H + d I)^-1``, float32), and the relative
    dampening that worked.

    With ``J`` the reversal permutation and ``J (H + d I) J = L L^T``, ``U = J L^-1 J``: one Cholesky and one
    triangular inverse (k^3 flops in all), instead of GPTQModel's Cholesky, ``cholesky_inverse`` and a second
    Cholesky (4k^3/3, and one more k x k buffer); 1.5x faster at k = 4096 and closer to the float64 factor."""
    mean_diag = float(torch.diagonal(h).mean())
    if not np.isfinite(mean_diag):
        raise GPTQError("the calibration Hessian has non-finite entries: the calibration run overflowed")
    d = damp
    for _ in range(12):
        hd = h.flip(0, 1)  # a copy; the diagonal stays the diagonal (reversed)
        hd.diagonal().add_(d * max(mean_diag, 1e-30))
        low, info = torch.linalg.cholesky_ex(hd)  # float32, as GPTQModel (float64 would double 1.5 GB)
        del hd
        if int(info) == 0:
            inv = _lower_inverse(low)
            del low
            up = inv.flip(0, 1)
            del inv
            if bool(torch.isfinite(up).all()):
                return up, d
        d *= 2
    raise GPTQError(f"H is not positive definite even with dampening {d / 2:g} x mean(diag): recalibrate with "
                    f"more samples")


def _lower_inverse(low: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by halves: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``
    (2k^3/3 flops in GEMMs; torch has no trtri, and a triangular solve against the identity costs k^3)."""
    n = low.shape[0]
    if n <= 1024:
        return torch.linalg.solve_triangular(low, torch.eye(n, dtype=low.dtype), upper=False)
    m = n // 2
    out = torch.zeros_like(low)
    a = _lower_inverse(low[:m, :m])
    out[:m, :m] = a
    c = _lower_inverse(low[m:, m:])
    out[m:, m:] = c
    out[m:, :m] = -(c @ (low[m:, :m] @ a))
    return out


def quantize(w: np.ndarray, h: np.ndarray, block: int, clip: str = "mse", zero_point: bool = False,
             act_order: bool = True, damp: float = DAMP, batch: int = BATCH, own_h: bool = False
             ) -> tuple[Int4Blocks, GPTQInfo]:
    """GPTQ of ``w`` [in, out] against ``h`` = X^T X [in, in] (any positive scale: only ratios matter).

    Returns blocks on the static per-block grids (see the module docstring) and what the pass did. ``own_h``: the
    caller hands ``h`` over (float32, not used afterwards) and the pass permutes it in place instead of copying
    it: on GLM-4-9B's down projection each copy is 750 MB, and a streamed build's peak is this pass.
    """
    k = w.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"H is {h.shape}, the weight has {k} input channels")
    threads = torch.get_num_threads()
    hm = np.asarray(h, dtype=np.float32) if own_h else np.array(h, dtype=np.float32)
    del h
    try:
        return _gptq(w, hm, block, clip, zero_point, act_order, damp, batch, threads)
    finally:
        torch.set_num_threads(threads)


def _gptq(w: np.ndarray, h_np: np.ndarray, block: int, clip: str, zero_point: bool, act_order: bool, damp: float,
          batch: int, threads: int = 1) -> tuple[Int4Blocks, GPTQInfo]:
    """``h_np``: float32, overwritten (``quantize`` passes a copy unless the caller owns it)."""
    k, n = w.shape
    h = torch.from_numpy(h_np)
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
    if act_order:  # h becomes H[perm][:, perm] in its own buffer: one k x k temporary, not a second H kept
        rows = h.index_select(0, perm)
        torch.index_select(rows, 1, perm, out=h)
        del rows
    up, used = hinv_factor(h, damp)
    group = perm // block  # the (original) block of each permuted channel
    lo, hi = (0.0, 15.0) if zero_point else (-8.0, 7.0)
    levels = np.empty((k, n), np.float32)  # q - zero, original channel order
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(k)
    step = max(1, ROW_CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        # Input channels as rows ([in, out-chunk], permuted): every per-channel step below reads and writes
        # contiguous rows, and the within-batch update is one BLAS rank-1 update (ger) per channel.
        wk = torch.from_numpy(np.ascontiguousarray(w0[:, r0:r1]))[perm].contiguous()
        s_all = scale[:, r0:r1].contiguous()  # [blocks, rows]
        z_all = None if zero is None else zero[:, r0:r1].contiguous()
        lv = torch.empty_like(wk)
        for i1 in range(0, k, batch):
            i2 = min(k, i1 + batch)
            w1 = wk[i1:i2].clone()
            err1 = torch.empty_like(w1)
            hinv1 = up[i1:i2, i1:i2]
            # The channel loop is thousands of small ops: one thread (OpenMP's fork/join per op cost 3.4x the
            # CPU time at 2 threads on a 4096 x 4096 weight, measured); the lazy-batch GEMM below gets every
            # thread. Results do not depend on the thread count.
            torch.set_num_threads(1)
            for j in range(i2 - i1):
                g = int(group[i1 + j])
                s = s_all[g]
                col = w1[j]
                if z_all is None:
                    q = torch.round(col / s).clamp_(lo, hi)
                else:
                    z = z_all[g]
                    q = (torch.round(col / s) + z).clamp_(lo, hi) - z
                lv[i1 + j] = q
                e = err1[j]
                torch.sub(col, q * s, out=e)
                e /= hinv1[j, j]
                if j + 1 < i2 - i1:
                    w1[j + 1:].addr_(hinv1[j, j + 1:], e, alpha=-1.0)
            torch.set_num_threads(threads)
            if i2 < k:
                wk[i2:].addmm_(up[i1:i2, i2:].T, err1, alpha=-1.0)
        levels[:, r0:r1] = lv[inv].numpy()
    blocks = _blocks(levels, grids)
    cols = _proxy_columns(n)
    gptq_err, rtn_err = _proxy(w0[:, cols], (_columns(blocks, cols).dequant(), _columns(grids, cols).dequant()), h,
                               perm.numpy())
    return blocks, GPTQInfo(damp=used, dead=int(dead.sum()), proxy_err=gptq_err, rtn_proxy_err=rtn_err)


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


def _columns(b: Int4Blocks, cols: np.ndarray) -> Int4Blocks:
    return Int4Blocks(b.q[:, cols], b.scale[:, cols], None if b.zero is None else b.zero[:, cols], b.k)


def _proxy_columns(n: int) -> np.ndarray:
    """The output channels the proxy errors are measured on: all of them up to PROXY_COLUMNS, else that many
    evenly spaced. The proxy is a diagnostic (report.json), and exact it would cost 4x the GPTQ pass itself
    (a [in, in] x [in, out] product per term); each channel's error is a sum over every input channel."""
    return np.arange(n) if n <= PROXY_COLUMNS else np.linspace(0, n - 1, PROXY_COLUMNS).round().astype(np.int64)


def _proxy(w: np.ndarray, quantized: tuple[np.ndarray, ...], h: torch.Tensor, perm: np.ndarray) -> list[float]:
    """Relative output error tr(D^T H D) / tr(W^T H W) of each quantized ``w`` (H already has the dead channels'
    ones), in one product with H. ``h`` is permuted (``H[perm][:, perm]``), so the rows are too: the traces are
    the same."""
    mats = [w] + [q - w for q in quantized]
    m = torch.from_numpy(np.ascontiguousarray(np.concatenate(mats, axis=1)[perm], dtype=np.float32))
    e = (m * (h @ m)).sum(0).double()
    n = w.shape[1]
    den = float(e[:n].sum())
    return [float(e[(i + 1) * n:(i + 2) * n].sum()) / max(den, 1e-30) for i in range(len(quantized))]
