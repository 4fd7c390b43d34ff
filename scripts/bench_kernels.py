"""The runtime's CPU kernels measured alone (docs/runtime.md, "The int4 CPU kernel", "The attention kernel").

    python scripts/bench_kernels.py step ARTIFACT [--slots 64,576,4096] [--rounds 2]
        one decode step (engine.step) at the end of a buffer of each size, ONNX Runtime's Attention vs the
        runtime's, one process per side, sides alternating; median of the steps after two warm-up steps
    python scripts/bench_kernels.py attention [--isa native,avx2] [--slots 64,576,4096] [--batch 1]
        ONNX's Attention alone at GLM-4-9B's decode shapes (32 query heads, 2 KV groups, head size 128, one query
        row at the end of a buffer of each size): ONNX Runtime's kernel vs the runtime's on each path, ms per
        decode step (40 layers), median of 50
    python scripts/bench_kernels.py matmul [--isa native|avx512vnni|avx2]
        glm_q4_matmul on GLM-4-9B's prefill shapes (M = 512 or 128, block 128), GFLOP/s (best of 3)
    python scripts/bench_kernels.py decode [--isa native|avx512vnni|avx2]
        glm_q4_matmul at M = 1 on GLM-4-9B's widest shapes, blocks 128 and 32, over 8 distinct matrices per shape
        (more than the L3), GB/s of weights and scales read (median of 5)

2 threads. Run it alone on a quiet machine and name the CPU beside the numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def step_once(artifact: str, slots: list[int], steps: int = 8) -> dict:
    from glm_runtime.api import load

    engine = load(artifact, threads=2, verify="none").engine
    out: dict = {"engine": engine.describe()}
    ids, pos, idx = (np.zeros((1, 1), np.int64) for _ in range(3))
    for n in slots:
        cache = engine.allocate(1, n)
        times = []
        for i in range(steps):
            pos[0, 0] = n - steps - 1 + i  # the context fills the buffer, as the runtime sizes it
            t0 = time.perf_counter()
            engine.step(cache, ids, pos, idx)
            times.append(time.perf_counter() - t0)
        out[str(n)] = float(np.median(times[2:]) * 1e3)
        del cache
    return out


def attention(slots: list[int], batch: int, reps: int = 50) -> dict:
    """One process, one path (GLM_Q4_ISA): ONNX Runtime's Attention and the library's on the same inputs, ms for
    the 40 layers of a step (the op's median x 40)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from glm_runtime import cpu_kernel

    kernel = cpu_kernel.load(2)
    if kernel is None:
        raise SystemExit("the runtime's library is not built (bash scripts/setup.sh)")
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], scale=128**-0.5)
    shapes = {"q": ["b", 32, 1, 128], "k": ["b", 2, "t", 128], "v": ["b", 2, "t", 128]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in shapes.items()]
    inputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, ["b", 1, 1, "t"]))
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)]).SerializeToString()
    sessions = {}
    for side in ("ort", "runtime"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        if side == "runtime":  # as an int4 session runs it: on the library's pool
            cpu_kernel.configure(opts, kernel, matmul=True, attention=cpu_kernel.ATTENTION_POOL)
        sessions[side] = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out: dict = {"isa": cpu_kernel.attention_isa()}
    for t in slots:
        feed = {"q": rng.standard_normal((batch, 32, 1, 128), np.float32),
                "k": rng.standard_normal((batch, 2, t, 128), np.float32),
                "v": rng.standard_normal((batch, 2, t, 128), np.float32),
                "m": np.ones((batch, 1, 1, t), bool)}
        for side, sess in sessions.items():
            times = []
            for _ in range(reps + 3):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t0)
            out[f"{side} {t}"] = float(np.median(times[3:]) * 40e3)
    return out


def matmul(isa: str) -> None:
    from glm_runtime import cpu_kernel

    lib = ctypes.CDLL(str(cpu_kernel.library_path()))
    lib.glm_q4_isa.restype = ctypes.c_char_p
    lib.glm_q4_set_threads(2)
    rng = np.random.default_rng(0)
    for m, k, n in [(512, 4096, 27392), (512, 13696, 4096), (128, 4096, 4608)]:
        block = 128
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
        s = rng.uniform(0.001, 0.05, (n, k // block)).astype(np.float32)
        y = np.empty((m, n), np.float32)
        args = [x.ctypes.data_as(ctypes.c_void_p), m, k, w.ctypes.data_as(ctypes.c_void_p),
                s.ctypes.data_as(ctypes.c_void_p), n, block, y.ctypes.data_as(ctypes.c_void_p)]
        lib.glm_q4_matmul(*args)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            lib.glm_q4_matmul(*args)
            best = min(best, time.perf_counter() - t0)
        print(f"{lib.glm_q4_isa().decode()}: M={m} K={k} N={n}: {best * 1e3:.1f} ms, "
              f"{2 * m * k * n / best / 1e9:.0f} GFLOP/s")


def decode() -> None:
    from glm_runtime import cpu_kernel

    lib = ctypes.CDLL(str(cpu_kernel.library_path()))
    lib.glm_q4_isa.restype = ctypes.c_char_p
    lib.glm_q4_set_threads(2)
    rng = np.random.default_rng(0)
    copies = 8
    for k, n in [(4096, 27392), (13696, 4096)]:
        for block in (128, 32):
            ws = [rng.integers(0, 256, (n, k // 2), dtype=np.uint8) for _ in range(copies)]
            ss = [rng.uniform(0.001, 0.05, (n, k // block)).astype(np.float32) for _ in range(copies)]
            x = rng.standard_normal((1, k)).astype(np.float32)
            y = np.empty((1, n), np.float32)
            calls = [[x.ctypes.data_as(ctypes.c_void_p), 1, k, w.ctypes.data_as(ctypes.c_void_p),
                      sc.ctypes.data_as(ctypes.c_void_p), n, block, y.ctypes.data_as(ctypes.c_void_p)]
                     for w, sc in zip(ws, ss, strict=True)]
            for args in calls:
                lib.glm_q4_matmul(*args)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for args in calls:
                    lib.glm_q4_matmul(*args)
                times.append(time.perf_counter() - t0)
            t = float(np.median(times))
            read = copies * (n * k // 2 + n * (k // block) * 4)
            print(f"{lib.glm_q4_isa().decode()}: M=1 K={k} N={n} block {block}: {t / copies * 1e3:.2f} ms, "
                  f"{read / t / 1e9:.1f} GB/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    st = sub.add_parser("step")
    st.add_argument("artifact")
    st.add_argument("--slots", default="64,576,4096")
    st.add_argument("--rounds", type=int, default=2)
    st.add_argument("--one", choices=("auto", "ort"), help=argparse.SUPPRESS)  # a child process: one side
    at = sub.add_parser("attention")
    at.add_argument("--isa", default="native,avx2", help="paths to run, each in its own process (native, avx2)")
    at.add_argument("--slots", default="64,576,4096")
    at.add_argument("--batch", type=int, default=1)
    at.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    mm = sub.add_parser("matmul")
    mm.add_argument("--isa", choices=("native", "avx512vnni", "avx2"), default="native")
    dc = sub.add_parser("decode")
    dc.add_argument("--isa", choices=("native", "avx512vnni", "avx2"), default="native")
    args = ap.parse_args()
    if args.what in ("matmul", "decode"):
        if args.isa != "native" and os.environ.get("GLM_Q4_ISA") != args.isa:  # the library reads it once
            env = dict(os.environ, GLM_Q4_ISA=args.isa)
            raise SystemExit(subprocess.call([sys.executable, __file__, args.what], env=env))
        matmul(args.isa) if args.what == "matmul" else decode()
        return
    if args.what == "attention":
        slots = [int(v) for v in args.slots.split(",")]
        if args.one:
            print(json.dumps(attention(slots, args.batch)))
            return
        for isa in args.isa.split(","):
            if isa not in ("native", "avx2"):
                raise SystemExit(f"--isa {isa}: use native or avx2 (the runtime does not load its kernels on the "
                                 "scalar path)")
            env = dict(os.environ)
            env.pop("GLM_Q4_ISA", None)
            if isa != "native":
                env["GLM_Q4_ISA"] = isa
            out = subprocess.run([sys.executable, __file__, "attention", "--slots", args.slots, "--batch",
                                  str(args.batch), "--one"], env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            for t in slots:
                print(f"{isa} (runtime path {res['isa']}), batch {args.batch}, {t} slots: ONNX Runtime "
                      f"{res[f'ort {t}']:.1f} ms, runtime {res[f'runtime {t}']:.1f} ms per 40 layers", flush=True)
        return
    slots = [int(v) for v in args.slots.split(",")]
    if args.one:
        print(json.dumps(step_once(args.artifact, slots)))
        return
    for r in range(args.rounds):
        for side in ("ort", "auto"):
            env = dict(os.environ, GLM_RUNTIME_ATTENTION_KERNEL=side)
            out = subprocess.run([sys.executable, __file__, "step", args.artifact, "--slots", args.slots,
                                  "--one", side], env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}, attention {side}: "
                  + ", ".join(f"{n} slots {res[str(n)]:.1f} ms" for n in slots), flush=True)
    print(f"({Path(args.artifact).name}; {res['engine']})")


if __name__ == "__main__":
    main()
