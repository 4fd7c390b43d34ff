"""The runtime's attention (runtime/csrc/attention.c): ONNX's Attention over the cache slots the mask admits.

Every case is checked against a float64 reference with a bound derived from float32 arithmetic (not from any
machine's output), and ONNX Runtime's own Attention must meet the same bound on the same inputs, so the bound is
neither too loose to catch a wrong kernel nor too tight for a correct one.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from glm_runtime import cpu_kernel

EPS = float(np.finfo(np.float32).eps)
ISAS = ("avx512", "avx2", "scalar")


def gamma(n: int) -> float:
    return n * EPS / (1 - n * EPS)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """float64 attention and, per output element, the bound on a float32 computation's error: scores carry
    gamma(D) of their absolute dot products (plus the scale's rounding), the exponential a few ulp, the sums
    gamma(T); each relative error of a probability moves the output by at most that error times sum p |v|."""
    b, hq, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    rep = hq // hkv
    kk = np.nan_to_num(np.repeat(k.astype(np.float64), rep, axis=1))  # NaN only where the mask refuses
    vv = np.nan_to_num(np.repeat(v.astype(np.float64), rep, axis=1))
    qs = q.astype(np.float64) * scale
    scores = qs @ kk.transpose(0, 1, 3, 2)
    absdot = np.abs(qs) @ np.abs(kk).transpose(0, 1, 3, 2)
    m = np.broadcast_to(mask, (b, 1, s, t))
    scores = np.where(m, scores, -np.inf)
    mx = scores.max(-1, keepdims=True)
    p = np.exp(scores - np.where(np.isfinite(mx), mx, 0))
    p = np.where(m, p, 0)
    total = p.sum(-1, keepdims=True)
    p = p / np.where(total > 0, total, 1)
    y = p @ vv
    ds = (gamma(d) + 2 * EPS) * np.where(m, absdot, 0).max(-1, keepdims=True)  # per query row
    rel = 2 * ds + 8 * EPS + 2 * gamma(t)
    bound = (p @ np.abs(vv)) * rel + 4 * EPS * np.abs(y) + 1e-30
    return y, bound


def case(b: int, hq: int, hkv: int, s: int, t: int, d: int, seed: int, holes: bool = False
         ) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, s, d), dtype=np.float32)
    k = (rng.standard_normal((b, hkv, t, d), dtype=np.float32) * 2).astype(np.float32)
    v = rng.standard_normal((b, hkv, t, d), dtype=np.float32)
    # the runtime's mask: slot <= position, rows at different positions (continuous batching), in a buffer longer
    # than the context; the slots past each row's context hold NaN: a kernel that reads them fails
    pos = (t * 3 // 4 - np.arange(b)[:, None] * 3).clip(0) + np.arange(s)[None, :]
    mask = np.arange(t)[None, None, None, :] <= pos[:, None, :, None]
    for row in range(b):
        k[row, :, pos[row].max() + 1:] = np.nan
        v[row, :, pos[row].max() + 1:] = np.nan
    if holes:  # a slot inside the context that the mask refuses (the runtime's buffers are zeroed: finite)
        mask[..., 1] = False
        k[..., 1, :] = 1e4
    return q, k, v, np.ascontiguousarray(mask)


def run_direct(lib: ctypes.CDLL, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
               scale: float, pool: bool) -> np.ndarray:
    b, hq, s, d = q.shape
    y = np.full(q.shape, np.nan, np.float32)
    ptr = [a.ctypes.data_as(ctypes.c_void_p) for a in (q, k, v, mask, y)]
    lib.glm_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int]
    rc = lib.glm_attention(*ptr, b, hq, k.shape[1], s, k.shape[2], d, int(mask.shape[0] != 1 or b == 1),
                                  ctypes.c_float(scale), int(pool))
    assert rc == 0
    return y


SHAPES = [  # (batch, q heads, kv heads, query rows, buffer slots, head dim)
    (1, 32, 2, 1, 64, 128),     # GLM-4 decode, a short buffer
    (1, 32, 2, 1, 1031, 128),   # a buffer that is not a multiple of 4 or of the output chunk
    (3, 32, 2, 1, 200, 128),    # batched decode, rows at different positions
    (1, 32, 2, 37, 80, 128),    # a chunk of prefill after earlier tokens
    (2, 4, 2, 5, 16, 16),       # the tiny model: 2 heads per group, D = 16
    (1, 6, 3, 2, 9, 24),        # neither 16 heads per group nor D a multiple of 64
]


@pytest.fixture(scope="module")
def kernel() -> cpu_kernel.Q4Kernel:
    loaded = cpu_kernel.load(2)
    if loaded is None:
        pytest.skip("the runtime's kernels do not run on this CPU (no AVX2)")
    return loaded


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("holes", [False, True], ids=["prefix", "holes"])
def test_matches_the_reference_within_float32_bounds(kernel: cpu_kernel.Q4Kernel, shape: tuple[int, ...],
                                                     holes: bool) -> None:
    b, hq, hkv, s, t, d = shape
    q, k, v, mask = case(b, hq, hkv, s, t, d, seed=sum(shape), holes=holes)
    scale = d**-0.5
    ref, bound = reference(q, k, v, mask, scale)
    for pool in (False, True):
        y = run_direct(kernel.lib, q, k, v, mask, scale, pool)
        err = np.abs(y - ref)
        assert (err <= bound).all(), (pool, float((err / bound).max()))


def test_the_bound_catches_a_wrong_kernel(kernel: cpu_kernel.Q4Kernel) -> None:
    """The reference's bound is tight enough that attending one slot too many (the next, unwritten one) fails."""
    q, k, v, mask = case(1, 32, 2, 1, 64, 128, seed=5)
    ref, bound = reference(q, k, v, mask, 128**-0.5)
    wider = mask.copy()
    wider[0, 0, 0, int(mask[0, 0, 0].sum())] = True
    wrong = run_direct(kernel.lib, q, k, v, wider, 128**-0.5, pool=False)
    assert not (np.abs(wrong - ref) <= bound).all()


@pytest.mark.parametrize("isa", ISAS)
def test_every_path_of_this_cpu(isa: str) -> None:
    """GLM_Q4_ISA picks the path when the library loads: each path this CPU has, in its own process."""
    import subprocess
    import sys

    if cpu_kernel.library_path() is None:
        pytest.skip("the library is not built")
    script = f"""
import numpy as np, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from glm_runtime import cpu_kernel
import test_attention_kernel as t
import ctypes
lib = ctypes.CDLL(str(cpu_kernel.library_path()))  # also on the scalar path, where cpu_kernel.load declines
lib.glm_attention_isa.restype = ctypes.c_char_p
isa = lib.glm_attention_isa().decode()
if isa != {isa!r}:
    print("SKIP", isa); raise SystemExit
for shape in t.SHAPES:
    b, hq, hkv, s, tt, d = shape
    q, k, v, m = t.case(b, hq, hkv, s, tt, d, seed=1, holes=True)
    ref, bound = t.reference(q, k, v, m, d ** -0.5)
    y = t.run_direct(lib, q, k, v, m, d ** -0.5, pool=True)
    assert (np.abs(y - ref) <= bound).all(), shape
print("OK")
"""
    env = {**__import__("os").environ, "GLM_Q4_ISA": isa}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"this CPU has no {isa} path ({out.stdout.strip()})")
    assert out.stdout.strip() == "OK"


def test_a_row_the_mask_admits_nothing_of_is_zero(kernel: cpu_kernel.Q4Kernel) -> None:
    """As ONNX Runtime's Attention gives it (the runtime never makes such a row: a row's own slot is admitted)."""
    q, k, v, mask = case(1, 32, 2, 2, 16, 128, seed=3)
    mask[0, 0, 1] = False
    y = run_direct(kernel.lib, q, k, v, mask, 0.1, pool=True)
    assert (y[0, :, 1] == 0).all() and np.isfinite(y).all()
    feed = {"q": q, "k": np.nan_to_num(k), "v": np.nan_to_num(v), "m": mask}
    theirs = session(attention_model(0.1), None, 0).run(None, feed)[0]
    assert (theirs[0, :, 1] == 0).all()


def attention_model(scale: float, attrs: dict | None = None) -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], scale=scale, **(attrs or {}))
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "hq", "s", "d"]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", "hkv", "t", "d"]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "hkv", "t", "d"]),
              helper.make_tensor_value_info("m", TensorProto.BOOL, ["mb", 1, "s", "t"])]
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)]).SerializeToString()


def session(model: bytes, kernel: cpu_kernel.Q4Kernel | None, mode: int) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if kernel is not None:
        cpu_kernel.configure(opts, kernel, matmul=False, attention=mode)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mode", [cpu_kernel.ATTENTION_POOL, cpu_kernel.ATTENTION_CALLING_THREAD])
def test_stands_in_for_onnx_runtimes_attention(kernel: cpu_kernel.Q4Kernel, mode: int) -> None:
    """Registered in the ONNX domain for one session, it runs that session's Attention nodes (its call count
    moves) and no other session's; both kernels are within the reference's bound on the same inputs."""
    model = attention_model(128**-0.5)
    q, k, v, mask = case(2, 32, 2, 3, 100, 128, seed=11, holes=True)
    feed = {"q": q, "k": k, "v": v, "m": mask}
    ref, bound = reference(q, k, v, mask, 128**-0.5)
    before = kernel.attention_calls()
    ours = session(model, kernel, mode).run(None, feed)[0]
    assert kernel.attention_calls() == before + 1
    zeroed = {name: np.nan_to_num(a) if a.dtype == np.float32 else a for name, a in feed.items()}
    theirs = session(model, None, 0).run(None, zeroed)[0]  # it reads every slot: the runtime's are zeroed
    assert kernel.attention_calls() == before + 1
    assert (np.abs(ours - ref) <= bound).all()
    assert (np.abs(theirs - ref) <= bound).all()


def test_counts_nodes_it_cannot_run(kernel: cpu_kernel.Q4Kernel) -> None:
    """A causal flag or a softcap changes the op's meaning: such a node is counted when the session creates it
    (the engine then loads the graph without the kernel), and attention_form refuses the graph before that."""
    before = kernel.attention_unsupported()
    session(attention_model(0.1, {"softcap": 30.0}), kernel, cpu_kernel.ATTENTION_POOL)
    assert kernel.attention_unsupported() == before + 1


def test_its_vector_paths_stand_in(kernel: cpu_kernel.Q4Kernel) -> None:
    """Used exactly where the CPU (as /proc/cpuinfo says) has AVX-512 F and VL, or AVX2 and FMA, on the pool only
    beside the int4 kernel; GLM_Q4_ISA=avx2 (a child process) takes the AVX2 path and stands in as well."""
    import os
    import subprocess
    import sys

    from glm_runtime.hostinfo import cpu

    if os.environ.get("GLM_Q4_ISA"):
        pytest.skip("GLM_Q4_ISA forces a path")
    isa = set(cpu()["isa"])
    vector = {"avx512f", "avx512vl"} <= isa or {"avx2", "fma"} <= isa
    assert (cpu_kernel.attention_unavailable(kernel) is None) == vector
    modes = (cpu_kernel.attention_mode(kernel, True), cpu_kernel.attention_mode(kernel, False))
    assert modes == ((cpu_kernel.ATTENTION_POOL, cpu_kernel.ATTENTION_CALLING_THREAD) if vector
                     else (cpu_kernel.ATTENTION_OFF, cpu_kernel.ATTENTION_OFF))
    if not {"avx2", "fma"} <= isa:
        return
    script = ("from glm_runtime import cpu_kernel as c; k = c.load(2); "
              "print(c.attention_isa(), c.attention_unavailable(k), c.attention_mode(k, True))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GLM_Q4_ISA": "avx2"})
    assert out.stdout.split() == ["avx2", "None", str(cpu_kernel.ATTENTION_POOL)], out.stderr[-2000:]


# ---- through the engine, on the tiny fp32 artifact ----------------------------------------------------------------

def engine_logits(artifact: Path, mode: str, verify: str = "size") -> tuple[list[np.ndarray], str]:
    from glm_runtime.api import load

    engine = load(artifact, threads=2, verify=verify, attention_kernel=mode).engine
    ids = [151331, 151333, 9703, 3837, 24718, 11, 100, 2000, 13, 512, 77, 3]
    cache = engine.allocate(1, 40)  # a buffer longer than the context: the slots past it must not count
    rows = [engine.step(cache, np.array([ids[:6]]), np.arange(6)[None], np.array([[5]])).copy()]
    for i in range(6, len(ids)):
        rows.append(engine.step(cache, np.array([[ids[i]]]), np.array([[i]]), np.zeros((1, 1), np.int64)).copy())
    return [np.concatenate(rows)], engine.describe()


def test_engine_uses_it_on_a_whole_model(kernel: cpu_kernel.Q4Kernel, tiny_artifact: Path) -> None:
    """`auto` runs the artifact's Attention nodes on the kernel (on an AVX-512 or AVX2 CPU), `ort` on ONNX
    Runtime's; the logits agree to float32 rounding (a relative 1e-4 of their spread: two float32 orders of
    summation)."""
    before = kernel.attention_calls()
    ours, desc = engine_logits(tiny_artifact, "auto")
    if kernel.lib.glm_attention_isa().decode() not in ("avx512", "avx2"):
        assert kernel.attention_calls() == before and "attention" not in desc
        pytest.skip("the runtime's attention is used on AVX-512 and AVX2 CPUs only")
    assert kernel.attention_calls() > before and "glm-runtime attention" in desc
    calls = kernel.attention_calls()
    theirs, desc_ort = engine_logits(tiny_artifact, "ort")
    assert kernel.attention_calls() == calls and "glm-runtime attention" not in desc_ort
    spread = float(np.ptp(theirs[0]))
    assert np.abs(ours[0] - theirs[0]).max() <= 1e-4 * spread
    assert (ours[0].argmax(-1) == theirs[0].argmax(-1)).all()


def test_engine_falls_back_for_another_form(kernel: cpu_kernel.Q4Kernel, tiny_artifact: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """An artifact whose Attention nodes carry an attribute the kernel does not implement (a softcap) loads on
    ONNX Runtime's Attention, says why, and gives ONNX Runtime's numbers."""
    import logging
    import shutil

    import onnx
    from onnx import helper

    if cpu_kernel.attention_unavailable(kernel):
        pytest.skip("the runtime's attention is used on AVX-512 and AVX2 CPUs only")
    art = tmp_path / "softcap"
    shutil.copytree(tiny_artifact, art)
    model = onnx.load(str(art / "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "Attention":
            node.attribute.append(helper.make_attribute("softcap", 3.0))
    onnx.save(model, str(art / "model.onnx"))
    with caplog.at_level(logging.WARNING, logger="glm_runtime.engine_ort"):
        ours, desc = engine_logits(art, "auto", verify="none")
    assert "glm-runtime attention" not in desc
    assert any("Attention nodes have other attributes" in r.getMessage() for r in caplog.records)
    theirs, _ = engine_logits(art, "ort", verify="none")
    assert np.array_equal(ours[0], theirs[0])


def test_16_bit_artifacts_keep_onnx_runtimes_attention(kernel: cpu_kernel.Q4Kernel, tiny_checkpoint: Path,
                                                       tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The kernel is float32; an fp16 graph's Attention stays ONNX Runtime's without a failed session first."""
    import logging

    from glm_export.build import build_artifact

    build_artifact(tiny_checkpoint, tmp_path / "fp16", "fp16", validate=False, backend="onnxruntime")
    with caplog.at_level(logging.WARNING, logger="glm_runtime.engine_ort"):
        out, desc = engine_logits(tmp_path / "fp16", "auto")
    assert "glm-runtime attention" not in desc and np.isfinite(out[0]).all()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
