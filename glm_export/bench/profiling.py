"""Where a decode step of the runtime spends its time (``glm-export bench --profile``).

Runs in a bench worker process of its own: loads the artifact with ``glm_runtime.load`` exactly as the bench
does, except that ONNX Runtime's profiler is switched on (the session options are made with
``enable_profiling``; nothing else about the session, the IO binding or the in-place cache changes), runs one
warm-up and one measured generation, and splits each decode step of the measured one into

- Python: wall time of the step outside ``run_with_iobinding`` (our decode loop, sampling, bookkeeping);
- ORT framework: ``model_run`` time not spent inside any kernel (executor, thread-pool dispatch, profiler);
- kernels, per op type, and the slowest nodes with the weight bytes they read and the GB/s that implies.

The profiler itself adds a few microseconds per node, so absolute times are a little higher than in the
timed rounds; the shares are what this is for. Compare the GB/s of the big MatMuls with the machine's read
bandwidth (bench.json ``roofline``) to see whether the kernels, or the time between them, limit decoding.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from glm_export.bench.worker import prompt_ids

#: ops whose weight reads are what decoding is bound by (the embedding's Gather reads one row, not its table)
MATMUL_OPS = ("MatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "Gemm", "DynamicQuantizeMatMul",
              "FusedMatMul", "QLinearMatMul")
#: ops between a stored weight and its MatMul in a Q/DQ graph (ORT fuses them into the MatMul kernel)
WEIGHT_PATH_OPS = ("DequantizeLinear", "Cast", "Transpose", "Reshape")


def node_weight_bytes(model_path: Path) -> dict[str, int]:
    """Bytes of the stored weights each MatMul-type node reads, by node name, following Q/DQ chains back to the
    initializers (ORT fuses ``DequantizeLinear -> MatMul`` into one kernel that keeps the MatMul's name)."""
    import onnx

    from glm_export.bench.roofline import initializer_bytes

    sizes = initializer_bytes(model_path)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}

    def weight(name: str, depth: int = 0) -> int:
        if name in sizes:
            return sizes[name]
        node = producer.get(name)
        if node is None or node.op_type not in WEIGHT_PATH_OPS or depth > 4:
            return 0
        return sum(weight(i, depth + 1) for i in node.input if i)

    return {n.name: sum(weight(i) for i in n.input if i) for n in graph.node if n.op_type in MATMUL_OPS}


def profile_side(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    from glm_runtime import load
    from glm_runtime.manifest import read_manifest

    prefix = str(Path(job["result"]).with_suffix("")) + "-ort-profile"
    base = ort.SessionOptions

    class ProfilingOptions(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = prefix

    ort.SessionOptions = ProfilingOptions  # only while the runtime builds its session
    try:
        llm = load(job["artifact"], threads=job["threads"], verify="size", log_severity=3)
    finally:
        ort.SessionOptions = base
    batch, prompt_len = job["cases"][0]
    n = job["new_tokens"]
    prompts = prompt_ids(batch, prompt_len, job["vocab_size"], job["seed"])
    llm.generate(prompt_ids=prompts, max_new_tokens=n, temperature=0, stop_token_ids=())  # warm-up
    t0 = time.perf_counter()
    done = llm.generate(prompt_ids=prompts, max_new_tokens=n, temperature=0, stop_token_ids=())
    wall = time.perf_counter() - t0
    timings = (done[0] if isinstance(done, list) else done).timings
    events = json.loads(Path(llm.engine.session.end_profiling()).read_text())
    manifest = read_manifest(job["artifact"], verify="none")
    weights = node_weight_bytes(Path(job["artifact"]) / manifest.get("graph", {}).get("file", "model.onnx"))
    return {"case": [batch, prompt_len], "new_tokens": n, "wall_s": wall,
            **summarize_profile(events, n - 1, timings["decode_s"] / max(1, n - 1), weights)}


def summarize_profile(events: list[dict[str, Any]], decode_steps: int, wall_step_s: float,
                      weights: dict[str, int]) -> dict[str, Any]:
    """Per decode step: Python / ORT framework / kernel time, kernels by op type, the slowest nodes."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[-decode_steps:] if decode_steps else []
    nodes = sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"])
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    kernel_per_run = []
    i = 0
    for run in decode_runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        total = 0.0
        while i < len(nodes) and nodes[i]["ts"] < start:
            i += 1
        while i < len(nodes) and nodes[i]["ts"] < end:
            e = nodes[i]
            name = e["name"].removesuffix("_kernel_time")
            op_of[name] = e["args"].get("op_name", "?")
            by_op[op_of[name]] += e["dur"]
            by_node[name].append(e["dur"])
            total += e["dur"]
            i += 1
        kernel_per_run.append(total)
    steps = max(1, len(decode_runs))
    run_us = statistics.mean(r["dur"] for r in decode_runs) if decode_runs else 0.0
    kernel_us = statistics.mean(kernel_per_run) if kernel_per_run else 0.0
    wall_us = wall_step_s * 1e6
    top = sorted(by_node, key=lambda k: -sum(by_node[k]))[:10]
    mm_us = sum(sum(v) for k, v in by_node.items() if op_of[k] in MATMUL_OPS) / steps
    mm_bytes = sum(weights.get(k, 0) for k in by_node if op_of[k] in MATMUL_OPS)
    return {
        "decode_steps": len(decode_runs),
        "step_us": {"wall": wall_us, "ort_run": run_us, "kernels": kernel_us,
                    "python": max(0.0, wall_us - run_us), "ort_framework": max(0.0, run_us - kernel_us)},
        "ops_us": dict(sorted(((op, t / steps) for op, t in by_op.items()), key=lambda kv: -kv[1])),
        "matmul": {"us": mm_us, "weight_bytes": mm_bytes, "gb_s": mm_bytes / mm_us / 1e3 if mm_us else None},
        "top_nodes": [{"node": k, "op": op_of[k], "us": statistics.mean(by_node[k]), "weight_bytes": weights.get(k, 0),
                       "gb_s": weights[k] / statistics.mean(by_node[k]) / 1e3 if weights.get(k) else None}
                      for k in top],
    }


def markdown(profile: dict[str, Any], label: str) -> list[str]:
    """A few lines of bench.md: the step split, the op types, the slowest nodes."""
    s = profile["step_us"]
    b, p = profile["case"]
    lines = [f"### {label}: one decode step (batch {b}, prompt {p}, ONNX Runtime profiler on)", "",
             f"wall {s['wall'] / 1e3:.3f} ms = Python {s['python'] / 1e3:.3f} ms ({s['python'] / s['wall']:.1%}) + "
             f"ORT framework {s['ort_framework'] / 1e3:.3f} ms ({s['ort_framework'] / s['wall']:.1%}) + kernels "
             f"{s['kernels'] / 1e3:.3f} ms ({s['kernels'] / s['wall']:.1%}); mean of {profile['decode_steps']} steps.",
             ""]
    mm = profile["matmul"]
    if mm["gb_s"]:
        lines += [f"MatMul-type kernels: {mm['us'] / 1e3:.3f} ms per step reading {mm['weight_bytes'] / 1e9:.3f} GB "
                  f"of weights = {mm['gb_s']:.1f} GB/s.", ""]
    lines += ["| op type | µs per step | share of kernels |", "|---|---|---|"]
    lines += [f"| {op} | {us:.0f} | {us / s['kernels']:.1%} |" for op, us in list(profile["ops_us"].items())[:8]]
    lines += ["", "| slowest nodes | op | µs | weights | GB/s |", "|---|---|---|---|---|"]
    for n in profile["top_nodes"]:
        read = f"{n['weight_bytes'] / 1e6:.1f} MB" if n["weight_bytes"] else ""
        gb_s = "" if n["gb_s"] is None else f"{n['gb_s']:.1f}"
        lines.append(f"| {n['node']} | {n['op']} | {n['us']:.0f} | {read} | {gb_s} |")
    return [*lines, ""]
