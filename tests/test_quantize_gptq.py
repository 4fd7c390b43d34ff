"""GPTQ (``glm_export/quantize/gptq.py``): against the paper's unbatched algorithm written here in float64, its
output error against round-to-nearest on the same block grids, the grid itself, and both int4 graph forms."""

from __future__ import annotations

import numpy as np
import pytest

from glm_export.quantize import gptq
from glm_export.quantize.int4 import quantize as quantize_blocks
from glm_export.quantize.rewrite import Rewriter
from tests.test_quantize import assert_within_rounding, one_matmul, run


def layer(k: int = 192, n: int = 48, m: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random weight and a correlated input with channel scales spread over ~e^4, as LLM activations have."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 0.3, (k, k)) + np.eye(k)
    x = (rng.normal(size=(m, k)) @ mix * np.exp(rng.normal(0, 1, k))).astype(np.float32)
    return rng.normal(0, 0.05, (k, n)).astype(np.float32), x


def reference_gptq(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block: int,
                   act_order: bool) -> np.ndarray:
    """Algorithm 1 of the GPTQ paper without its speed-ups, in float64: after each channel, the inverse Hessian of
    the remaining channels by Gaussian elimination (OBS), no Cholesky, no lazy batches. Levels q - zero."""
    k = w.shape[0]
    hd = h.astype(np.float64) + gptq.DAMP * np.mean(np.diag(h)) * np.eye(k)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    hinv = np.linalg.inv(hd[np.ix_(order, order)])
    wt = w.T.astype(np.float64)[:, order]
    lv = np.zeros_like(wt)
    for j in range(k):
        g = order[j] // block
        s = scale[g].astype(np.float64)
        if zero is None:
            q = np.clip(np.round(wt[:, j] / s), -8, 7)
        else:
            z = zero[g].astype(np.float64)
            q = np.clip(np.round(wt[:, j] / s) + z, 0, 15) - z
        lv[:, j] = q
        err = (wt[:, j] - q * s) / hinv[j, j]
        wt[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    out = np.zeros_like(lv)
    out[:, order] = lv
    return out.T


def levels(blocks: gptq.Int4Blocks) -> np.ndarray:
    q = blocks.q[:blocks.k].astype(np.float64)
    if blocks.zero is not None:
        q = q - np.repeat(blocks.zero, blocks.block, axis=0)[:blocks.k]
    return q


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_unbatched_algorithm(zero_point: bool, act_order: bool) -> None:
    w, x = layer()
    h = x.T @ x
    got, info = gptq.quantize(w, h, 32, "mse", zero_point, act_order=act_order, batch=64)
    assert info.damp == gptq.DAMP and info.dead == 0
    ref = reference_gptq(w, h, got.scale, got.zero, 32, act_order)
    # float32 with lazy updates vs float64 step by step: a level can flip where a value sits on a rounding tie,
    # and that flip then shifts later updates by a fraction of a step; a wrong update order is off everywhere
    assert (levels(got) == ref).mean() > 0.98


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("zero_point", [False, True])
def test_gptq_output_error_below_round_to_nearest_on_its_grid(block: int, zero_point: bool) -> None:
    w, x = layer(k=256, seed=1)
    got, info = gptq.quantize(w, x.T @ x, block, "mse", zero_point)
    rtn = quantize_blocks(w, block, "mse", zero_point, (x**2).mean(0))  # the same static grids, rounded
    np.testing.assert_allclose(got.scale, rtn.scale, rtol=1e-4)  # importance sum vs mean: float32 rounding
    ref = x @ w

    def err(wq: np.ndarray) -> float:
        return float(((x @ wq - ref) ** 2).sum() / (ref**2).sum())

    assert err(got.dequant()) < 0.6 * err(rtn.dequant()), (err(got.dequant()), err(rtn.dequant()))
    assert info.proxy_err == pytest.approx(err(got.dequant()), rel=1e-3)
    # on the int4 grid of its block scales: (w / scale) + zero is an integer level of the int4 range
    lv = got.dequant() / np.repeat(got.scale, block, axis=0)[:w.shape[0]]
    if got.zero is not None:
        lv = lv + np.repeat(got.zero, block, axis=0)[:w.shape[0]]
    assert np.abs(lv - np.round(lv)).max() < 1e-3
    assert lv.min() >= (0 if zero_point else -8) - 1e-3 and lv.max() <= (15 if zero_point else 7) + 1e-3


def test_gptq_dead_inputs_and_dampening() -> None:
    w, x = layer(k=64, seed=2)
    x[:, 5] = 0.0  # a channel calibration never excited: its weights are never used, GPTQModel zeroes them
    x = x[:8]  # fewer rows than channels: H is singular without the dampening
    got, info = gptq.quantize(w, x.T @ x, 32, "mse", False)
    assert info.dead == 1 and np.isfinite(got.dequant()).all()
    assert (got.dequant()[5] == 0).all()
    with pytest.raises(gptq.GPTQError, match="non-finite"):
        gptq.quantize(w, np.full((64, 64), np.nan, np.float32), 32)


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
def test_gptq_blocks_through_both_graph_forms(fmt: str) -> None:
    w, x = layer(k=200, n=96, seed=3)
    blocks, _ = gptq.quantize(w, x.T @ x, 32, "mse", zero_point=fmt == "nbits")
    model = one_matmul(w)
    Rewriter(model).int4("lm_head.weight", blocks, fmt)
    xs = x[:7] / np.abs(x[:7]).max()
    got = run(model, xs, optimize=fmt == "nbits")  # optimized, ORT would fuse DQ + MatMul to MatMulNBits
    if fmt == "qdq":  # DequantizeLinear then a float MatMul: exact up to float32 summation
        assert_within_rounding(got, xs, blocks.dequant())
    else:  # accuracy_level 4 rounds the activations to int8 per block
        ref = xs @ blocks.dequant()
        assert np.abs(got - ref).max() / np.abs(ref).max() < 0.02


def test_gptq_proxy_error_on_a_sample_of_wide_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PROXY_COLUMNS output channels the reported errors are measured on evenly spaced channels (exact they
    would cost more than the pass itself): the same numbers as the output error over just those channels."""
    monkeypatch.setattr(gptq, "PROXY_COLUMNS", 16)
    w, x = layer(seed=3)
    got, info = gptq.quantize(w, x.T @ x, 32, "mse", False)
    rtn = quantize_blocks(w, 32, "mse", False, (x**2).mean(0))
    cols = np.linspace(0, w.shape[1] - 1, 16).round().astype(int)
    assert len(set(cols)) == 16 and cols[0] == 0 and cols[-1] == w.shape[1] - 1
    ref = x @ w[:, cols]

    def err(wq: np.ndarray) -> float:
        return float(((x @ wq[:, cols] - ref) ** 2).sum() / (ref**2).sum())

    assert info.proxy_err == pytest.approx(err(got.dequant()), rel=1e-3)
    assert info.rtn_proxy_err == pytest.approx(err(rtn.dequant()), rel=1e-3)


def test_hinv_factor_is_the_upper_cholesky_factor_of_the_damped_inverse() -> None:
    """k = 1500 takes the triangular inverse's recursive path (halves above 1024) as well as its base case."""
    import torch

    k = 1500
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4 * k, k)) * np.exp(rng.normal(0, 0.5, k))
    h = (x.T @ x).astype(np.float32)
    up, used = gptq.hinv_factor(torch.from_numpy(h))
    hd = h.astype(np.float64) + used * np.mean(np.diag(h)) * np.eye(k)
    ref = np.linalg.cholesky(np.linalg.inv(hd)).T  # upper: ref^T ref = hd^-1
    got = up.double().numpy()
    assert np.array_equal(got, np.triu(got)) and (np.diag(got) > 0).all()
    # backward-stable float32 factorisation and inverse: forward error ~ lambda sqrt(k) u cond(H) relative to the
    # factor (glm_export/numerics.py's probabilistic model, lambda = 8); without the dampening it is off by 0.23
    bound = 8 * np.sqrt(k) * 2.0**-24 * np.linalg.cond(hd)
    assert np.abs(got - ref).max() / np.abs(ref).max() < bound
