#!/usr/bin/env python3
"""Artifact size and ONNX Runtime CPU decode speed per precision, side by side with fp32, in one run.

    PYTHONPATH=.:runtime python scripts/bench_quant.py /work/models/glm-4-9b-2layer \
        --fp32 /work/models/2layer-onnx --work /tmp/bench-quant --calib-samples 16 \
        --precisions fp32,int8,int4,int4/b128/rtn/none/sym

A precision is ``fp32``, ``int8``, ``fp8``, ``int4`` (the defaults), or ``int4/...`` with any of: ``b32`` /
``b64`` / ``b128`` (block), ``awq`` / ``rtn`` / ``gptq`` / ``awq-gptq``, ``mse`` / ``none`` (clip search),
``zp`` / ``sym`` (zero points), ``head-fp`` (lm_head left unquantized), ``head8`` (lm_head int8 W8A8),
``kv8`` (int8 KV cache; also ``int8/kv8``), ``amax-pct`` / ``amax-mse`` (fp8 activation ranges: percentile
or MSE instead of abs-max); each variant gets its own directory.

With ``--gguf A.gguf,B.gguf`` (and ``--llama-build``, a llama.cpp build: see ``scripts/llamacpp.py``) each round
also runs ``llama-bench`` on every GGUF at the same threads, depth (``-d`` = the prompt length) and decode
length, interleaved with the ONNX Runtime sides, so the ratios come from one run on one machine load.

The fp32 graph (``--fp32``, or exported into ``--work``) is quantized into ``--work/<precision>`` unless that
artifact already exists; the fp32 files are copied first and never modified. Decoding uses IO binding with the
same cache
buffer bound as input and output (in place, as the runtime does), fixed threads, medians over runs. The
bandwidth bound is measured read bandwidth (a 2-thread torch reduction over 1 GiB) divided by the bytes a
decode step must read: every weight except the embedding (a Gather reads one row) plus the KV cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from glm_export.checkpoint import Checkpoint
from glm_export.export import graph_io, write_manifest
from glm_export.quantize.rewrite import QuantOptions, quantize_into


def parse_variant(spec: str, base: QuantOptions) -> tuple[str, QuantOptions]:
    """``int4/b32/awq/mse/zp`` -> ("int4", options); see the module docstring."""
    precision, *tokens = spec.split("/")
    opts = base
    for t in tokens:
        if t.startswith("b") and t[1:].isdigit():
            opts = replace(opts, weight_block=int(t[1:]))
        elif t in ("awq", "rtn", "gptq", "awq-gptq"):
            opts = replace(opts, weight_method=t)
        elif t in ("mse", "none"):
            opts = replace(opts, weight_clip=t)
        elif t in ("zp", "sym"):
            opts = replace(opts, weight_zero_point=t == "zp")
        elif t == "kv8":
            opts = replace(opts, kv_cache="int8")
        elif t == "head-fp":
            opts = replace(opts, lm_head="float")
        elif t in ("amax-pct", "amax-mse"):
            opts = replace(opts, fp8_act_range={"amax-pct": "percentile", "amax-mse": "mse"}[t])
        elif t == "head8":
            opts = replace(opts, lm_head="int8")
        else:
            raise SystemExit(f"unknown variant token {t!r} in {spec!r}")
    return precision, opts


def read_bandwidth(threads: int, runs: int = 7) -> dict[str, float]:
    """Read bandwidth two ways, best of ``runs``: a torch reduction over 1 GiB, and ONNX Runtime's own fp32 GEMV
    over a 1 GiB weight (the decode workload; it reads a few % faster here than the reduction)."""
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(threads)
    t = torch.ones(2**28)
    best = min(_timed(t.sum) for _ in range(runs))
    k, n = 8192, 32768
    w = numpy_helper.from_array(np.full((k, n), 0.5, np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(g).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = {"x": np.ones((1, k), np.float32)}
    gemv = min(_timed(lambda: sess.run(None, x)) for _ in range(runs))
    return {"torch_sum": 2**30 / best, "ort_gemv": k * n * 4 / gemv}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(artifact: Path) -> tuple[int, int]:
    """(bytes of all initializers, bytes a decode step reads: all but the embedding)."""
    m = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    total = per_token = 0
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(
            t.data_type, 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
        nbytes = (n * bits + 7) // 8
        total += nbytes
        if t.name != "embed.weight":
            per_token += nbytes
    return total, per_token


def decode_speed(artifact: Path, cfg, threads: int, prompt: int, tokens: int, runs: int,
                 int4_kernel: bool = False, attention: bool = True) -> dict[str, float]:
    """``int4_kernel``: run MatMulNBits on the runtime's kernel (glm_runtime.cpu_kernel), as glm-runtime does.
    ``attention``: run Attention on the runtime's where glm-runtime would (an AVX-512 CPU)."""
    from glm_runtime import cpu_kernel

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    disabled = None
    kernel = cpu_kernel.load(threads) if int4_kernel or attention else None
    if int4_kernel and kernel is None:
        raise SystemExit("error: the runtime's int4 kernel is not built here (pip install -e ./runtime)")
    mode = cpu_kernel.attention_mode(kernel, int4_kernel) if attention and kernel is not None else 0
    if kernel is not None and (int4_kernel or mode):
        disabled = cpu_kernel.configure(opts, kernel, matmul=int4_kernel, attention=mode)
    sess = ort.InferenceSession(str(artifact / "model.onnx"), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)
    cache_len = prompt + tokens
    shape = (1, cfg.num_kv_heads, cache_len, cfg.head_dim)
    dtype = np.int8 if sess.get_inputs()[3].type == "tensor(int8)" else np.float32  # --kv-cache-dtype int8
    caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype)) for _ in range(2 * cfg.num_layers)]
    names = [f"{kv}_{i}" for i in range(cfg.num_layers) for kv in ("key", "value")]
    rng = np.random.default_rng(0)
    prefill_ms, tok_s = [], []
    if int4_kernel and kernel is not None:  # the kernel moves its weights onto huge pages after their first run,
        warm = sess.io_binding()              # in the background: measure once that is done, as llama-bench warms up
        for name, c in zip(names, caches, strict=True):
            warm.bind_ortvalue_input(f"past_{name}", c)
            warm.bind_ortvalue_output(f"present_{name}", c)
        warm.bind_output("logits")
        zero = np.zeros((1, 1), np.int64)
        for name in ("input_ids", "position_ids", "logits_index"):
            warm.bind_cpu_input(name, zero)
        t0 = time.perf_counter()
        sess.run_with_iobinding(warm)
        while kernel.hugepage_pending() and time.perf_counter() - t0 < 120:
            sess.run_with_iobinding(warm)
            time.sleep(0.05)
        print(f"warm-up: int4 weights on huge pages after {time.perf_counter() - t0:.1f} s "
              f"({kernel.hugepage_bytes() / 1e9:.2f} GB)", flush=True)
    for _ in range(runs):
        binding = sess.io_binding()
        for name, c in zip(names, caches, strict=True):
            binding.bind_ortvalue_input(f"past_{name}", c)
            binding.bind_ortvalue_output(f"present_{name}", c)
        binding.bind_output("logits")

        def step(ids: np.ndarray, pos: np.ndarray, last: np.ndarray, b: ort.IOBinding = binding) -> int:
            b.bind_cpu_input("input_ids", ids)
            b.bind_cpu_input("position_ids", pos)
            b.bind_cpu_input("logits_index", last)
            sess.run_with_iobinding(b)
            return int(b.get_outputs()[0].numpy()[0, -1].argmax())

        ids = rng.integers(0, cfg.vocab_size, (1, prompt), dtype=np.int64)
        t0 = time.perf_counter()
        tok = step(ids, np.arange(prompt, dtype=np.int64)[None], np.array([[prompt - 1]], np.int64))
        t1 = time.perf_counter()
        for i in range(tokens):
            tok = step(np.array([[tok]], np.int64), np.array([[prompt + i]], np.int64), np.zeros((1, 1), np.int64))
        t2 = time.perf_counter()
        prefill_ms.append(1000 * (t1 - t0))
        tok_s.append(tokens / (t2 - t1))
    return {"prefill_ms": statistics.median(prefill_ms), "decode_tok_s": statistics.median(tok_s)}


def llama_decode(build: Path, gguf: Path, threads: int, prompt: int, tokens: int) -> list[float]:
    """llama.cpp decode tok/s of ``tokens`` tokens after ``prompt`` tokens of context (llama-bench ``-d``), as
    :func:`decode_speed` measures ours."""
    import subprocess

    from llamacpp import LlamaCppError, parse_bench_json, tool

    cmd = [str(tool(build, "llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(tokens),
           "-d", str(prompt), "-r", "1", "-o", "json"]
    proc = subprocess.run(cmd, text=True, errors="replace", capture_output=True)
    if proc.returncode != 0:
        raise LlamaCppError(f"llama-bench failed on {gguf}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return parse_bench_json(proc.stdout)[0]["tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--fp32", type=Path, help="an existing fp32 artifact of MODEL (else exported into --work)")
    ap.add_argument("--work", type=Path, default=Path("bench-quant"))
    ap.add_argument("--precisions", default="fp32,int8,fp8,int4")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--accuracy-samples", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--int4-kernel", choices=("auto", "ort", "both"), default="both",
                    help="int4 variants: run them on the runtime's kernel (auto, as glm-runtime does), on ONNX "
                         "Runtime's MatMulNBits (ort), or both (two rows each)")
    ap.add_argument("--attention-kernel", choices=("auto", "ort"), default="auto",
                    help="Attention on the runtime's kernel where glm-runtime uses it (auto) or on ONNX Runtime's")
    ap.add_argument("--gguf", default="", help="comma-separated GGUF files measured by llama-bench in each round")
    ap.add_argument("--llama-build", type=Path, default=Path("/work/tools/llama.cpp"),
                    help="llama.cpp build directory (for --gguf)")
    args = ap.parse_args()
    ggufs = [Path(g) for g in args.gguf.split(",") if g]
    if ggufs:
        from llamacpp import LlamaCppError, tool

        try:
            tool(args.llama_build, "llama-bench")
        except LlamaCppError as e:
            raise SystemExit(f"error: {e}") from None
    cfg = Checkpoint(args.model).config
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.fp32
    if fp32 is None:
        from glm_export.export import export_onnx

        fp32 = args.work / "fp32"
        if not (fp32 / "model.onnx").is_file():
            export_onnx(args.model, fp32)
    bws = read_bandwidth(args.threads)
    bw = max(bws.values())
    arts = []
    base = QuantOptions(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                        accuracy_samples=args.accuracy_samples)
    for spec in args.precisions.split(","):
        precision, opts = parse_variant(spec, base)
        art = fp32 if precision == "fp32" else args.work / spec.replace("/", "_")
        if precision != "fp32" and not (art / "model.onnx").is_file():
            shutil.rmtree(art, ignore_errors=True)
            art.mkdir(parents=True)
            for f in fp32.iterdir():  # copies: onnx_ir refuses hard-linked external data
                if f.is_file():
                    shutil.copyfile(f, art / f.name)
            t0 = time.perf_counter()
            report = quantize_into(args.model, art, precision, opts)
            (art / "quantization.md").write_text(report["markdown"])
            (art / "quantization.json").write_text(json.dumps(report, indent=1))
            # the fp32 one, copied (read without its checks: an int4 graph under 2 GB has no model.onnx.data any more,
            # which the fp32 manifest still lists); describe this graph instead
            manifest = json.loads((art / "manifest.json").read_text())
            manifest["precision"], manifest["graph"] = precision, graph_io(art / "model.onnx")
            write_manifest(art, manifest)  # so glm-runtime / glm-export bench can load the artifact
            print(f"{precision}: quantized in {time.perf_counter() - t0:.0f} s")
        if precision == "int4" and args.int4_kernel in ("auto", "both"):
            arts.append((spec + " (glm-runtime kernel)", art))
        if precision != "int4" or args.int4_kernel in ("ort", "both"):
            arts.append((spec + (" (ORT MatMulNBits)" if precision == "int4" else ""), art))
    # Interleaved rounds (one run of every precision per round, a fresh session each time): on a shared machine
    # the load changes within minutes, and consecutive per-precision medians would compare different loads.
    runs: dict[str, list[dict[str, float]]] = {spec: [] for spec, _ in arts}
    llama: dict[Path, list[float]] = {g: [] for g in ggufs}
    for r in range(args.runs):
        for spec, art in arts:
            runs[spec].append(decode_speed(art, cfg, args.threads, args.prompt, args.tokens, 1,
                                           int4_kernel=spec.endswith("(glm-runtime kernel)"),
                                           attention=args.attention_kernel == "auto"))
            print(f"round {r + 1}: {spec}: {runs[spec][-1]}", flush=True)
        for g in ggufs:
            llama[g] += llama_decode(args.llama_build, g, args.threads, args.prompt, args.tokens)
            print(f"round {r + 1}: llama.cpp {g.name}: {llama[g][-1]:.2f} tok/s", flush=True)
    rows = []
    for spec, art in arts:
        files = sum(f.stat().st_size for f in art.glob("model.onnx*"))
        _, per_token = weight_bytes(art)
        kv_bytes = 1 if "kv8" in spec else 4
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * (args.prompt + args.tokens) * cfg.head_dim * kv_bytes
        speed = {k: statistics.median(x[k] for x in runs[spec]) for k in ("prefill_ms", "decode_tok_s")}
        bound = bw / (per_token + kv)
        acc = {}
        if (art / "quantization.json").is_file():
            acc = json.loads((art / "quantization.json").read_text()).get("accuracy", {})
        rows.append((spec, files, per_token, speed, bound, acc))
    print(f"\nread bandwidth ({args.threads} threads): torch reduction {bws['torch_sum'] / 1e9:.1f} GB/s, ONNX "
          f"Runtime fp32 GEMV {bws['ort_gemv'] / 1e9:.1f} GB/s; the bound uses the larger.\n"
          f"ONNX Runtime {ort.__version__}, {args.threads} threads, prompt {args.prompt}, {args.tokens} decode "
          f"tokens, median of {args.runs} interleaved rounds\n")
    print("| precision | model files | bytes read per token | prefill ms | decode tok/s | bound tok/s | of bound "
          "| mean KL | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, files, per_token, speed, bound, acc in rows:
        kl = f"{acc['mean_kl']:.4g}" if "mean_kl" in acc else ""
        top1 = f"{acc['top1_agreement']:.3f}" if "top1_agreement" in acc else ""
        print(f"| {spec} | {files / 2**30:.2f} GiB | {per_token / 2**30:.2f} GiB | {speed['prefill_ms']:.0f} | "
              f"{speed['decode_tok_s']:.1f} | {bound:.1f} | {speed['decode_tok_s'] / bound:.0%} | {kl} | {top1} |")
    for g, tok_s in llama.items():
        print(f"| llama.cpp {g.stem} | {g.stat().st_size / 2**30:.2f} GiB | | | {statistics.median(tok_s):.1f} | | | "
              "| |")
    if llama:
        print(f"\nllama.cpp rows: llama-bench -t {args.threads} -d {args.prompt} -n {args.tokens} -r 1 (its own "
              "warm-up run first), one run per round, interleaved with the rows above; decode tok/s is the median")


if __name__ == "__main__":
    main()
