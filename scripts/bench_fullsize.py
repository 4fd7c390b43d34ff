"""Runtime numbers of a full-size artifact (README "Full-size GLM-4-9B"): load time, RSS after load and at the end,
prefill of a 512-token prompt, decode tok/s at batch 1 (and 4 with --batch4), greedy, EOS ignored.

    python scripts/bench_fullsize.py ARTIFACT [--threads 2] [--decode 32] [--batch4] [--int4-kernel auto|ort]
                                             [--attention-kernel auto|ort] [--json out.json]

Run it alone under ``nice`` on a shared machine and say so beside its numbers; one process per artifact so the
RSS is that artifact's. Prompts are random token ids (the random-weight checkpoints have no meaningful text).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import time
from pathlib import Path
from typing import Any


def rss_gb() -> tuple[float, float]:
    """(current VmRSS, peak VmHWM) in GB."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line.split(":")[0]] = int(line.split()[1]) * 1024 / 1e9
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)


def run(llm: Any, batch: int, prompt_len: int, decode: int) -> dict[str, Any]:
    rng = random.Random(batch)
    vocab = llm.manifest["model"]["vocab_size"] if hasattr(llm, "manifest") else 151552
    prompts = [[rng.randrange(1000, min(vocab, 150000)) for _ in range(prompt_len)] for _ in range(batch)]
    t0 = time.perf_counter()
    done = llm.generate(prompt_ids=prompts if batch > 1 else prompts[0], max_new_tokens=decode, temperature=0,
                        stop_token_ids=())
    wall = time.perf_counter() - t0
    first = done[0] if isinstance(done, list) else done
    t = first.timings if isinstance(first.timings, dict) else first.timings.to_dict()
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": decode, "wall_s": round(wall, 2),
            "ttft_s": t["ttft_s"], "decode_tok_s_per_seq": t["decode_tokens_per_s"],
            "decode_tok_s_total": round(t["decode_tokens_per_s"] * batch, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batch4", action="store_true")
    ap.add_argument("--int4-kernel", choices=("auto", "ort"), default="auto",
                    help="int4 artifacts: the runtime's kernel (auto) or ONNX Runtime's MatMulNBits (ort)")
    ap.add_argument("--attention-kernel", choices=("auto", "ort"), default="auto",
                    help="the runtime's attention (auto, on AVX-512 CPUs) or ONNX Runtime's")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from glm_runtime.api import load
    from glm_runtime.hostinfo import cpu

    size = sum(p.stat().st_size for p in args.artifact.iterdir() if p.is_file())
    t0 = time.perf_counter()
    llm = load(args.artifact, threads=args.threads, verify="size", int4_kernel=args.int4_kernel,
                attention_kernel=args.attention_kernel)
    load_s = time.perf_counter() - t0
    rss_load, _ = rss_gb()
    # the int4 weights move onto huge pages in the background after loading: measure the steady state after it
    settle = llm.engine.settle() if hasattr(llm.engine, "settle") else 0.0
    out: dict[str, Any] = {"artifact": str(args.artifact), "artifact_gb": round(size / 1e9, 2),
                           "load_s": round(load_s, 1), "rss_after_load_gb": round(rss_load, 2),
                           "hugepages_settled_s": round(settle, 1), "rss_after_settle_gb": round(rss_gb()[0], 2),
                           "threads": args.threads, "cpu": cpu().get("model"), "python": platform.python_version(),
                           "engine": llm.engine.describe(),
                           "runs": []}
    print(json.dumps(out), flush=True)
    out["runs"].append(run(llm, 1, args.prompt, args.decode))
    print(json.dumps(out["runs"][-1]), flush=True)
    if args.batch4:
        out["runs"].append(run(llm, 4, args.prompt, args.decode))
        print(json.dumps(out["runs"][-1]), flush=True)
    rss, peak = rss_gb()
    out.update(rss_end_gb=round(rss, 2), rss_peak_gb=round(peak, 2))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
