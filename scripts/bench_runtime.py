"""glm-runtime (ONNX Runtime) side by side with transformers' GlmForCausalLM on the same weights.

    python scripts/bench_runtime.py ARTIFACT [--checkpoint DIR] [--threads 2] [--prompt-tokens 128]
                                    [--new-tokens 128] [--runs 3] [--rounds 2] [--json OUT]

Batch 1, greedy, the same random prompt ids on both sides, stop ids ignored so every run decodes the same
number of tokens. Each side runs in its own subprocess (so peak RSS is that side's alone, and the two 6-GB
models never share the machine's RAM), alternately for ``--rounds`` rounds of ``--runs`` runs; the report
gives medians and the ratios, which is what survives a shared, noisy machine.

Also measured: memory read bandwidth (numpy; best of several probes, see ``bandwidth``), and from it the
decode bound ``bandwidth / bytes read per token`` (every weight except the embedding table, plus the KV
cache); and the runtime's own overhead per token (wall time outside ONNX Runtime's run call).

The checkpoint defaults to the one the artifact was exported from (manifest ``source.path``). A
chatglm-layout checkpoint is given to transformers by renaming its tensors through glm_export's layout table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "runtime"), str(REPO)]


def peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM``, not ``ru_maxrss``: Linux carries ru_maxrss over from the parent
    across fork + exec, which would credit a worker with the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(n: int, vocab: int = 151000, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# ---- workers (each in its own process) ------------------------------------------------------------------
def worker_ort(args: argparse.Namespace) -> dict[str, Any]:
    from glm_runtime import load

    t0 = time.perf_counter()
    llm = load(args.artifact, threads=args.threads, verify="size")
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    prompt = prompt_ids(args.prompt_tokens)
    llm.generate(prompt_ids=prompt[:16], max_new_tokens=4, temperature=0, stop_token_ids=())  # warm-up
    runs = []
    for _ in range(args.runs):
        done = llm.generate(prompt_ids=prompt, max_new_tokens=args.new_tokens, temperature=0, stop_token_ids=())
        t = done.timings
        runs.append({"ttft_s": t["ttft_s"], "decode_tok_s": t["decode_tokens_per_s"],
                     "overhead": t["overhead_fraction"], "tokens": done.output_ids})
    return {"load_s": load_s, "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(), "runs": runs,
            "engine": llm.engine.describe()}


def hf_model(checkpoint: Path, attn: str) -> Any:
    """GlmForCausalLM in fp32 on the checkpoint's weights, whichever layout it is stored in."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from glm_export.checkpoint import Checkpoint, source_parts
    from glm_export.random_model import hf_config

    ckpt = Checkpoint(checkpoint)
    if ckpt.layout == "hf":
        return GlmForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation=attn)
    cfg = ckpt.config
    hf = {k: v for k, v in hf_config(cfg, "hf").items() if k not in ("model_type", "architectures")}
    config = GlmConfig(**hf, attn_implementation=attn)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    state = {}
    for canonical in ckpt.canonical_names():  # the rows of a fused tensor, split under the hf names
        tensor, offset = ckpt.tensor(canonical, torch.float32), 0
        for name, shape in source_parts(cfg, "hf", canonical):
            state[name] = tensor[offset:offset + shape[0]]
            offset += shape[0]
    model.load_state_dict(state, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffer was on meta
    return model.eval()


def worker_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = hf_model(args.checkpoint, args.attn)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()

    class Clock(BaseStreamer):
        """generate() calls put() with the prompt, then with each new token: timestamp the tokens."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())
            self.tokens += value.flatten().tolist()

        def end(self) -> None:
            pass

    prompt = torch.tensor([prompt_ids(args.prompt_tokens)])
    n = args.new_tokens
    kw = {"do_sample": False, "min_new_tokens": n, "pad_token_id": 0, "top_p": None, "temperature": None,
          "top_k": None}
    runs = []
    with torch.inference_mode():
        model.generate(prompt[:, :16], max_new_tokens=4, **kw)  # warm-up
        for _ in range(args.runs):
            clock = Clock()
            start = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=n, streamer=clock, **kw)
            first, last = clock.times[1], clock.times[-1]
            runs.append({"ttft_s": first - start, "decode_tok_s": (n - 1) / (last - first),
                         "tokens": out[0, prompt.shape[1]:].tolist()})
    return {"load_s": load_s, "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(), "runs": runs,
            "engine": f"transformers GlmForCausalLM fp32, attn {args.attn}, torch {torch.__version__}"}


# ---- bandwidth ------------------------------------------------------------------------------------------
def bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth in GB/s, best of ``repeats``, by several numpy probes over a ``gib``-GiB array.

    numpy's ``sum`` is partly compute bound on CPUs without wide vector units, so it understates what
    streaming reads reach; OpenBLAS's matrix-vector product reads its matrix once, as decoding does. The
    bound uses the highest, so the fraction reported against it is conservative.
    """
    import numpy as np

    a = np.ones(int(gib * 2**30) // 4, np.float32)
    parts = np.array_split(a, 8 * threads)
    matrix, vector = a.reshape(-1, 4096), np.ones(4096, np.float32)
    pool = ThreadPoolExecutor(threads)

    def best(fn: Any, nbytes: int) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    out = {"sum_1thread": best(a.sum, a.nbytes),
           f"sum_{threads}threads": best(lambda: list(pool.map(np.sum, parts)), a.nbytes),
           "gemv_openblas": best(lambda: matrix @ vector, a.nbytes)}
    b = np.empty_like(a)
    out["copy_read+write"] = best(lambda: np.copyto(b, a), 2 * a.nbytes)
    out["read_bound"] = max(v for k, v in out.items() if k != "copy_read+write")
    return out


# ---- orchestration ------------------------------------------------------------------------------------
def run_worker(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, str(args.artifact), "--worker", kind, "--checkpoint", str(args.checkpoint),
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--attn", args.attn]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if kind != "bandwidth":
        print(f"  {kind}: {args.runs} runs ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{kind} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="runs per worker process")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both workers")
    parser.add_argument("--attn", default="eager", help="transformers attn_implementation (eager / sdpa)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=["ort", "torch", "bandwidth"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    if args.checkpoint is None:
        args.checkpoint = Path(manifest["source"]["path"])
    if args.worker:
        workers = {"ort": worker_ort, "torch": worker_torch, "bandwidth": lambda a: bandwidth(a.threads)}
        print(json.dumps(workers[args.worker](args)))
        return

    from glm_runtime.config import DTYPE_BYTES, ModelConfig

    cfg = ModelConfig.from_dict(manifest["model"])
    dtype = manifest["dtype"]
    if dtype != "float32":
        print(f"note: the artifact is {dtype}; the PyTorch side runs fp32", file=sys.stderr)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        order = ("ort", "torch") if r % 2 == 0 else ("torch", "ort")  # alternate who runs first
        rnd = {"bandwidth": run_worker("bandwidth", args)}  # in a child too: this process stays small
        for kind in order:
            rnd[kind] = run_worker(kind, args)
        rounds.append(rnd)

    embed = cfg.vocab_size * cfg.hidden_size
    weights_per_token = (cfg.num_parameters() - embed) * DTYPE_BYTES[dtype]  # one embedding row is read, not all
    cache_len = args.prompt_tokens + args.new_tokens
    kv_per_token = cfg.kv_cache_bytes_per_token(dtype) * cache_len  # attention reads the whole (sized) buffer
    bytes_per_token = weights_per_token + kv_per_token

    def side(kind: str) -> dict[str, Any]:
        runs = [run for rnd in rounds for run in rnd[kind]["runs"]]
        s = {"ttft_s": median([x["ttft_s"] for x in runs]), "decode_tok_s": median([x["decode_tok_s"] for x in runs]),
             "best_decode_tok_s": max(x["decode_tok_s"] for x in runs),
             "peak_rss_gb": max(rnd[kind]["peak_rss_mb"] for rnd in rounds) / 1024,
             "load_s": median([rnd[kind]["load_s"] for rnd in rounds]), "runs": len(runs),
             "engine": rounds[0][kind]["engine"],
             "all_ttft_s": [round(x["ttft_s"], 4) for x in runs],
             "all_decode_tok_s": [round(x["decode_tok_s"], 3) for x in runs]}
        if kind == "ort":
            s["overhead"] = median([x["overhead"] for x in runs])
        return s

    def round_median(rnd: dict[str, Any], kind: str, key: str) -> float:
        return median([x[key] for x in rnd[kind]["runs"]])

    per_round = []
    for rnd in rounds:
        bound = rnd["bandwidth"]["read_bound"] * 1e9 / bytes_per_token
        per_round.append({
            "decode_speedup": round_median(rnd, "ort", "decode_tok_s") / round_median(rnd, "torch", "decode_tok_s"),
            "ttft_ratio": round_median(rnd, "ort", "ttft_s") / round_median(rnd, "torch", "ttft_s"),
            "bandwidth_gb_s": rnd["bandwidth"]["read_bound"],
            "ort_fraction_of_bound": round_median(rnd, "ort", "decode_tok_s") / bound,
            "torch_fraction_of_bound": round_median(rnd, "torch", "decode_tok_s") / bound})
    ort_s, pt_s = side("ort"), side("torch")
    best_bw = max(rnd["bandwidth"]["read_bound"] for rnd in rounds)
    best_bound = best_bw * 1e9 / bytes_per_token
    tokens = rounds[0]["ort"]["runs"][0]["tokens"], rounds[0]["torch"]["runs"][0]["tokens"]
    agree = sum(a == b for a, b in zip(*tokens, strict=False))
    report = {
        "artifact": str(args.artifact), "checkpoint": str(args.checkpoint), "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "dtype": dtype,
        "glm_runtime": ort_s, "transformers": pt_s,
        # Headline ratios: the median over rounds of each round's side-by-side ratio (robust to drifting load).
        "ratios": {"decode_speedup": median([p["decode_speedup"] for p in per_round]),
                   "ttft_ratio": median([p["ttft_ratio"] for p in per_round]),
                   "peak_rss_ratio": ort_s["peak_rss_gb"] / pt_s["peak_rss_gb"]},
        "per_round": per_round,
        "bandwidth_gb_s": [rnd["bandwidth"] for rnd in rounds],
        "bytes_per_token_gb": bytes_per_token / 1e9,
        "fraction_of_bound": {
            "glm_runtime": median([p["ort_fraction_of_bound"] for p in per_round]),
            "transformers": median([p["torch_fraction_of_bound"] for p in per_round]),
            "glm_runtime_best_run_vs_best_bandwidth": ort_s["best_decode_tok_s"] / best_bound,
            "transformers_best_run_vs_best_bandwidth": pt_s["best_decode_tok_s"] / best_bound},
        "best_bound_tok_s": best_bound,
        "greedy_tokens_agree": f"{agree}/{min(len(t) for t in tokens)}",
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def print_table(r: dict[str, Any]) -> None:
    g, t, q, f = r["glm_runtime"], r["transformers"], r["ratios"], r["fraction_of_bound"]
    print(f"\n{r['artifact']} ({r['dtype']}), batch 1, {r['prompt_tokens']}-token prompt, {r['new_tokens']} new "
          f"tokens, {r['threads']} threads; {len(r['per_round'])} rounds, medians of {g['runs']} runs per side; "
          f"ratios = median of the per-round side-by-side ratios\n")
    print(f"| {'':24} | {'glm-runtime (ORT)':>18} | {'transformers':>14} | {'ratio':>8} |")
    print(f"|{'-' * 26}|{'-' * 20}|{'-' * 16}|{'-' * 10}|")
    print(f"| {'time to first token':24} | {g['ttft_s'] * 1e3:15.0f} ms | {t['ttft_s'] * 1e3:11.0f} ms | "
          f"{q['ttft_ratio']:7.2f}x |")
    print(f"| {'decode tokens/s':24} | {g['decode_tok_s']:18.2f} | {t['decode_tok_s']:14.2f} | "
          f"{q['decode_speedup']:7.2f}x |")
    print(f"| {'best decode tokens/s':24} | {g['best_decode_tok_s']:18.2f} | {t['best_decode_tok_s']:14.2f} | "
          f"{'':8} |")
    print(f"| {'peak RSS':24} | {g['peak_rss_gb']:15.2f} GB | {t['peak_rss_gb']:11.2f} GB | "
          f"{q['peak_rss_ratio']:7.2f}x |")
    print(f"| {'fraction of bw bound':24} | {f['glm_runtime']:17.0%} | {f['transformers']:13.0%} | {'':8} |")
    print(f"| {'  best run / best bw':24} | {f['glm_runtime_best_run_vs_best_bandwidth']:17.0%} | "
          f"{f['transformers_best_run_vs_best_bandwidth']:13.0%} | {'':8} |")
    print(f"| {'load time':24} | {g['load_s']:16.1f} s | {t['load_s']:12.1f} s | {'':8} |")
    print(f"\nruntime overhead per token (outside ORT's run call): {g['overhead']:.2%} of the step")
    for i, (p, bw) in enumerate(zip(r["per_round"], r["bandwidth_gb_s"], strict=True), 1):
        probes = ", ".join(f"{k} {v:.1f}" for k, v in bw.items() if k != "read_bound")
        print(f"round {i}: decode x{p['decode_speedup']:.2f}, TTFT x{p['ttft_ratio']:.2f}; bandwidth GB/s: {probes}")
    print(f"bytes read per decoded token: {r['bytes_per_token_gb']:.2f} GB -> bound {r['best_bound_tok_s']:.2f} tok/s "
          f"at the best bandwidth")
    print(f"greedy tokens identical between the two: {r['greedy_tokens_agree']}")
    print(f"engines: {g['engine']}; {t['engine']}")


if __name__ == "__main__":
    main()
