"""The runtime's int4 CPU kernel (runtime/csrc/q4_matmul.c, glm_runtime.cpu_kernel).

The reference is written here in numpy from MatMulNBits' definition (weights = (nibble - 8) x block scale) and
accuracy_level 4's activation rule (per block: scale = max|x| / 127 in float32, x x (1 / scale) rounded to
nearest even, clipped to +-127), with the integer dot products exact. What float32 may add on top is bounded from
the arithmetic: the kernel sums 8 consecutive products exactly in int32 (one SIMD lane), scales that by activation
scale x weight scale in float32 (two roundings) and adds the K / 8 lane terms in some order, so its error is at
most (K / 8 + 2) x u x sum|lane term| (first order, any summation order).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from glm_runtime import cpu_kernel
from glm_runtime.hostinfo import cpu

U32 = float(np.finfo(np.float32).eps) / 2

# (K, N, block, M): K tails (352 = 2 x 128 + 96, 96 < 128), odd N (pairs of weight rows in prefill), M over the
# 64-row prefill block and not a multiple of 4, M >= 16 (the across-rows prefill kernel, with partial 32-row
# tiles), every block size the builder writes and two more; decode (M = 1) at block 32 and at 128 and 256 (one
# weight scale per 128-element chunk: a broadcast); the AMX prefill (K and block multiples of 64, M >= 16) over its
# 256-row work items, with a partial 16-row tile and partial 32-column tiles.
CASES = [(256, 72, 32, 1), (4096, 67, 32, 1), (13696, 40, 32, 1), (352, 9, 32, 5), (96, 5, 32, 7),
         (512, 33, 64, 6), (384, 40, 128, 3), (512, 9, 256, 4), (4096, 130, 32, 70), (128, 3, 16, 2),
         (4096, 70, 128, 33), (352, 45, 32, 20), (13696, 37, 32, 17), (4096, 40, 128, 1), (13696, 24, 128, 1),
         (768, 11, 256, 1), (4096, 70, 128, 300), (13696, 37, 128, 40), (512, 33, 64, 20), (768, 20, 256, 17)]


def case_data(k: int, n: int, block: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, (n, k // block)).astype(np.float32)
    x = (rng.standard_normal((m, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)  # uneven channels
    x[0, : block // 2] = 0.0  # a block with a zero half, and (below) one all zero: scale 0
    if k >= 2 * block:
        x[-1, block: 2 * block] = 0.0
    return x, packed, scales


def reference(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact result of the quantized arithmetic in float64, the float32 error bound per output)."""
    m, k = x.shape
    n = packed.shape[0]
    xb = x.reshape(m, k // block, block)
    sx = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(sx > 0, np.float32(1) / sx, np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint((xb * inv[..., None]).astype(np.float32)), -127, 127).astype(np.int64)
    q = np.empty((n, k), np.int64)
    q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
    lanes = np.einsum("mgk,ngk->mng", xq.reshape(m, k // 8, 8), (q - 8).reshape(n, k // 8, 8))  # exact integers
    lane_block = np.arange(k // 8) * 8 // block
    terms = lanes * sx.astype(np.float64)[:, None, lane_block] * scales.astype(np.float64)[None][:, :, lane_block]
    bound = (k // 8 + 2) * U32 * np.abs(terms).sum(-1) + 1e-30
    return terms.sum(-1), bound


RUNNER = """
import ctypes, sys, numpy as np
lib = ctypes.CDLL(sys.argv[1])
lib.glm_q4_isa.restype = ctypes.c_char_p
lib.glm_q4_set_threads(2)
data = np.load(sys.argv[2])
out = {"isa": np.array(lib.glm_q4_isa().decode())}
for i in range(int(data["count"])):
    x, b, s = data[f"x{i}"], data[f"b{i}"], data[f"s{i}"]
    y = np.full((x.shape[0], b.shape[0]), np.nan, np.float32)
    rc = lib.glm_q4_matmul(x.ctypes.data_as(ctypes.c_void_p), x.shape[0], x.shape[1],
                           b.ctypes.data_as(ctypes.c_void_p), s.ctypes.data_as(ctypes.c_void_p), b.shape[0],
                           int(data[f"block{i}"]), y.ctypes.data_as(ctypes.c_void_p))
    assert rc == 0, rc
    out[f"y{i}"] = y
np.savez(sys.argv[3], **out)
"""


def test_the_kernel_is_built_and_used_on_this_cpu() -> None:
    """The install compiles it (runtime/setup.py); a machine of this project's kind has a C compiler and AVX2."""
    assert cpu_kernel.library_path() is not None, "glm_runtime._q4_matmul is not built: pip install -e ./runtime"
    kernel = cpu_kernel.load(2)
    if "avx2" not in cpu()["isa"]:
        assert kernel is None
        pytest.skip("this CPU has no AVX2: the runtime uses ONNX Runtime's MatMulNBits")
    assert kernel is not None and kernel.isa in ("avx2", "avx512vnni", "avx512vnni+amx")


@pytest.mark.parametrize("isa", ["native", "avx512vnni", "avx2", "scalar"])
def test_matches_the_quantized_arithmetic(isa: str, tmp_path: Path) -> None:
    """Every code path (forced with GLM_Q4_ISA, one process each: the path is chosen once) against the reference:
    decode (M = 1, rows split between threads) and prefill (2 x 4 blocking, tiles, tails; AMX tiles where the CPU
    has AMX: `native` there, `avx512vnni` forces the path without)."""
    path = cpu_kernel.library_path()
    assert path is not None
    flags = set(cpu()["isa"])
    vnni512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    if isa == "avx2" and "avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    if isa == "avx512vnni" and not vnni512:
        pytest.skip("this CPU has no AVX-512 VNNI")
    data = {"count": np.array(len(CASES))}
    refs = []
    for i, (k, n, block, m) in enumerate(CASES):
        x, packed, scales = case_data(k, n, block, m, seed=i)
        data.update({f"x{i}": x, f"b{i}": packed, f"s{i}": scales, f"block{i}": np.array(block)})
        refs.append(reference(x, packed, scales, block))
    np.savez(tmp_path / "in.npz", **data)
    env = dict(os.environ, GLM_Q4_ISA=isa)
    subprocess.run([sys.executable, "-c", RUNNER, str(path), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True, env=env, timeout=120)
    out = np.load(tmp_path / "out.npz")
    native = ("avx512vnni+amx" if {"amx_tile", "amx_int8"} <= flags else "avx512vnni") if vnni512 else "avx2"
    want = {"scalar": "scalar", "avx2": "avx2", "avx512vnni": "avx512vnni", "native": native}
    assert str(out["isa"]) == want[isa]
    for i, (ref, bound) in enumerate(refs):
        err = np.abs(out[f"y{i}"].astype(np.float64) - ref)
        assert (err <= bound).all(), (CASES[i], float((err / bound).max()))


def one_node(k: int, n: int, block: int, packed: np.ndarray, scales: np.ndarray, level: int = 4) -> bytes:
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(packed.reshape(n, k // block, block // 2), "B"),
         numpy_helper.from_array(scales.reshape(-1), "S")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(
        "com.microsoft", 1)]).SerializeToString()


def session(model: bytes, kernel: cpu_kernel.Q4Kernel | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    disabled = cpu_kernel.configure(opts, kernel) if kernel is not None else None
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def test_stands_in_for_matmulnbits_in_onnx_runtime() -> None:
    """Registered as com.microsoft::MatMulNBits, it runs the node (its call count moves), reads the weights in
    MatMulNBits' layout, and gives ONNX Runtime's own kernel's numbers (both within the reference's bound)."""
    kernel = cpu_kernel.load(2)
    if kernel is None:
        pytest.skip("the kernel does not run on this CPU (no AVX2)")
    k, n, block = 4096, 96, 32
    x, packed, scales = case_data(k, n, block, 6, seed=7)
    ref, bound = reference(x, packed, scales, block)
    model = one_node(k, n, block, packed, scales)
    before = kernel.calls()
    ours = session(model, kernel).run(None, {"x": x.reshape(2, 3, k)})[0].reshape(6, n)
    assert kernel.calls() == before + 1
    theirs = session(model, None).run(None, {"x": x.reshape(2, 3, k)})[0].reshape(6, n)
    assert kernel.calls() == before + 1  # a session without the library keeps ORT's kernel
    assert (np.abs(ours - ref) <= bound).all()
    assert (np.abs(theirs - ref) <= bound).all()  # ORT's MatMulNBits, accuracy_level 4: the same arithmetic


def test_counts_nodes_it_cannot_run() -> None:
    """accuracy_level 0 asks for float activations, which the kernel does not do: it refuses the node at session
    creation (the engine then builds the session without it) instead of giving other numbers."""
    kernel = cpu_kernel.load(2)
    if kernel is None:
        pytest.skip("the kernel does not run on this CPU (no AVX2)")
    _, packed, scales = case_data(256, 8, 32, 1, seed=1)
    before = kernel.unsupported()
    session(one_node(256, 8, 32, packed, scales, level=0), kernel)
    assert kernel.unsupported() == before + 1


def test_mode_comes_from_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernel.ENV, "ort")
    assert cpu_kernel.resolve_mode(None) == "ort" and cpu_kernel.resolve_mode("auto") == "auto"
    monkeypatch.setenv(cpu_kernel.ENV, "fast")
    with pytest.raises(ValueError, match="GLM_RUNTIME_INT4_KERNEL"):
        cpu_kernel.resolve_mode(None)
    with pytest.raises(ValueError, match="auto, ort"):
        cpu_kernel.resolve_mode("mlas")


# ---- the engine on a real (tiny) int4 artifact -------------------------------------------------------------------

PROMPTS = [[151331, 151333, 9703, 3837, 24718, 11, 100, 2000, 13, 512, 77, 3], [5, 900, 77, 3, 12, 8000, 41]]


def int4_artifact(tiny_checkpoint: Path, out: Path, zero_point: bool) -> Path:
    from glm_export.build import build_artifact
    from glm_export.quantize.rewrite import QuantOptions

    opts = QuantOptions(calib_samples=8, calib_seq_len=64, accuracy_samples=1, weight_method="rtn",
                        weight_zero_point=zero_point)
    build_artifact(tiny_checkpoint, out, "int4", validate=False, quant=opts, backend="onnxruntime")
    return out


@pytest.fixture(scope="module")
def int4_art(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return int4_artifact(tiny_checkpoint, tmp_path_factory.mktemp("q4") / "int4", zero_point=False)


def logits(artifact: Path, mode: str | None) -> tuple[list[np.ndarray], str]:
    """Per prompt: the logits after a prefill of its first half (M > 1), then after each further token (M = 1)."""
    from glm_runtime.api import load

    engine = load(artifact, threads=2, verify="size", int4_kernel=mode).engine
    out = []
    for ids in PROMPTS:
        cache = engine.allocate(1, 32)
        half = len(ids) // 2
        rows = [engine.step(cache, np.array([ids[:half]]), np.arange(half)[None], np.array([[half - 1]])).copy()]
        for i in range(half, len(ids)):
            rows.append(engine.step(cache, np.array([[ids[i]]]), np.array([[i]]), np.zeros((1, 1), np.int64)).copy())
        out.append(np.concatenate(rows))
    return out, engine.describe()


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsoftmax(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64) - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))

    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_engine_uses_it_with_onnx_runtimes_accuracy(int4_art: Path, tiny_artifact: Path) -> None:
    """`auto` runs every MatMulNBits of an int4 artifact on the kernel and `ort` on ONNX Runtime's; against the fp32
    artifact both lose the same: both quantize activations alike, and their float sums differ only in order, which
    can flip a later int8 rounding (measured here: KL to fp32 2.78e-3 both, KL between them 3e-15)."""
    kernel = cpu_kernel.load(2)
    if kernel is None:
        pytest.skip("the kernel does not run on this CPU (no AVX2)")
    ref, _ = logits(tiny_artifact, None)
    before = kernel.calls()
    ours, ours_desc = logits(int4_art, "auto")
    assert kernel.calls() > before and "glm-runtime int4 kernel" in ours_desc
    calls = kernel.calls()
    theirs, theirs_desc = logits(int4_art, "ort")
    assert kernel.calls() == calls and "ONNX Runtime MatMulNBits" in theirs_desc
    kl_ours = np.mean([kl(r, o) for r, o in zip(ref, ours, strict=True)])
    kl_theirs = np.mean([kl(r, t) for r, t in zip(ref, theirs, strict=True)])
    assert 0 < kl_ours <= 1.25 * kl_theirs + 1e-6, (kl_ours, kl_theirs)
    top1 = [np.mean(r.argmax(-1) == o.argmax(-1)) for r, o in zip(ref, ours, strict=True)]
    top1_theirs = [np.mean(r.argmax(-1) == t.argmax(-1)) for r, t in zip(ref, theirs, strict=True)]
    assert np.mean(top1) >= np.mean(top1_theirs) - 0.1


def test_engine_falls_back_for_zero_points(tiny_checkpoint: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Zero points are a fourth MatMulNBits input the kernel's schema does not take: ONNX Runtime refuses the graph
    with the library, and the engine loads it again without, says why, and runs it."""
    if cpu_kernel.load(2) is None:
        pytest.skip("the kernel does not run on this CPU (no AVX2)")
    art = int4_artifact(tiny_checkpoint, tmp_path / "zp", zero_point=True)
    with caplog.at_level(logging.WARNING, logger="glm_runtime.engine_ort"):
        out, desc = logits(art, "auto")
    assert "ONNX Runtime MatMulNBits" in desc
    assert any("cannot run this graph" in r.getMessage() for r in caplog.records)
    assert all(np.isfinite(o).all() for o in out)


def test_engine_without_the_library(int4_art: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An install without a C compiler has no library: int4 artifacts run on ONNX Runtime's kernel, and
    `glm-runtime env` says the kernel is not built."""
    from glm_runtime import hostinfo

    monkeypatch.setattr(cpu_kernel, "library_path", lambda: None)
    monkeypatch.setattr(cpu_kernel, "_loaded", None)
    art = tmp_path / "copy"
    shutil.copytree(int4_art, art)
    _, desc = logits(art, "auto")
    assert "ONNX Runtime MatMulNBits" in desc
    assert hostinfo.int4_kernel_info() == {"built": False}
    assert "int4 kernel: not built" in hostinfo.render(hostinfo.collect())
    json.dumps(hostinfo.collect())


def test_weights_that_do_not_match_their_node_are_refused(int4_art: Path, tmp_path: Path) -> None:
    """An artifact is untrusted: a MatMulNBits whose weight tensor is shorter than K, N and the block say must not
    be read past its end. The kernel refuses the run (it sees the tensors only then), the engine's load-time step
    notices, and the artifact goes to ONNX Runtime's kernel, whose load check names the tensor: one ArtifactError,
    as with --int4-kernel ort."""
    import onnx
    from onnx import numpy_helper

    from glm_runtime.api import load
    from glm_runtime.manifest import ArtifactError

    kernel = cpu_kernel.load(2)
    if kernel is None:
        pytest.skip("the kernel does not run on this CPU (no AVX2)")
    art = tmp_path / "cut"
    shutil.copytree(int4_art, art)
    model = onnx.load(str(art / "model.onnx"))
    weight = next(t for t in model.graph.initializer if t.name.endswith("gate_up.weight_nbits"))
    rows = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array(rows[: rows.shape[0] // 2].copy(), weight.name))
    onnx.save(model, str(art / "model.onnx"))
    refused = kernel.bad_inputs()
    for mode in ("auto", "ort"):
        with pytest.raises(ArtifactError, match="does not match attribute-derived shape"):
            load(art, threads=2, verify="none", int4_kernel=mode)
    assert kernel.bad_inputs() == refused + 1
