"""The runtime's CPU kernels measured alone (docs/runtime.md, "The int4 CPU kernel", "The attention kernel").

    python scripts/bench_kernels.py step ARTIFACT [--slots 64,576,4096] [--rounds 2]
        one decode step (engine.step) at the end of a buffer of each size, ONNX Runtime's Attention vs the
        runtime's, one process per side, sides alternating; median of the steps after two warm-up steps
    python scripts/bench_kernels.py matmul [--isa native|avx512vnni]
        glm_q4_matmul on GLM-4-9B's prefill shapes (M = 512 or 128, block 128), GFLOP/s (best of 3)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    st = sub.add_parser("step")
    st.add_argument("artifact")
    st.add_argument("--slots", default="64,576,4096")
    st.add_argument("--rounds", type=int, default=2)
    st.add_argument("--one", choices=("auto", "ort"), help=argparse.SUPPRESS)  # a child process: one side
    mm = sub.add_parser("matmul")
    mm.add_argument("--isa", choices=("native", "avx512vnni"), default="native")
    args = ap.parse_args()
    if args.what == "matmul":
        if args.isa != "native" and os.environ.get("GLM_Q4_ISA") != args.isa:
            env = dict(os.environ, GLM_Q4_ISA=args.isa)
            raise SystemExit(subprocess.call([sys.executable, __file__, "matmul"], env=env))
        matmul(args.isa)
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
