"""Multi-turn load test of ``glm-runtime serve`` alone vs on Ray Serve (1 or 2 replicas, affine or default
routing): what Serve costs per request and what routing and replicas buy.

    python scripts/bench_ray.py ARTIFACT --configs single,ray1,ray2-pow2,ray2-affinity --clients 6 --duration 60

Each config starts its own server process (``glm-runtime serve ARTIFACT [--ray ...]`` on a free loopback port),
warms it up, runs the clients for ``--duration`` seconds, then stops it with SIGTERM. Every client holds
conversations of ``--turns`` turns under one ``x-session-id``: each turn appends the previous answer and a new
user message, so turn k's prompt starts with turn k-1's whole history (what a prefix cache can reuse).
Requests stream ``/v1/chat/completions`` with ``ignore_eos`` (each answer is ``--max-tokens`` long); with
``--token-ids``, ``/v1/completions`` with token-id prompts (for artifacts without a tokenizer).

Reported per config: requests and errors, requests/s, generated tokens/s, time to first token (to the first
chunk with text, not the chat stream's opening role chunk) p50/p99 (all turns and turns >= 2), affinity (share
of turns >= 2 answered by the replica that answered the turn before, from the ``x-glm-replica`` header), the
prefix cache's hit rates over all replicas (from each replica's ``/metrics``; only when the scheduler has a
prefix cache), server CPU seconds per request (user + system time of the server's whole process tree: Ray's
GCS, raylet, proxy, controller and replicas included) and the tree's RSS.
Prints a markdown table and, with ``--json``, one JSON line per config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from load_test import sse_events  # scripts/ is on sys.path when run as python scripts/bench_ray.py

REPO = Path(__file__).resolve().parents[1]
WORDS = ("sea wind river stone light cloud field road tree city night fire snow rain bird song ship star "
         "garden bridge market winter summer morning evening mountain valley forest harbour island").split()
VOCAB = 151000  # GLM-4's ordinary token ids (the specials start at 151329)
#: Why requests failed, across the run (printed per config).
ERRORS: Counter[str] = Counter()
CONFIGS = {
    "single": [],
    "ray1": ["--ray", "--replicas", "1", "--router", "pow2"],
    "ray1-affinity": ["--ray", "--replicas", "1"],
    "ray2-pow2": ["--ray", "--replicas", "2", "--router", "pow2"],
    "ray2-affinity": ["--ray", "--replicas", "2", "--router", "affinity"],
}


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_and_rss(pid: int) -> tuple[float, int]:
    """User + system CPU seconds and RSS bytes of the process tree under ``pid``."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    cpu, rss = 0.0, 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: argparse.Namespace, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    ray = "--ray" in extra
    replicas = int(extra[extra.index("--replicas") + 1]) if ray else 1
    threads = max(1, args.threads // replicas)
    cmd = [sys.executable, "-c", "from glm_runtime.cli import app; app()", "-q", "serve", str(args.artifact),
           "--port", str(port), "--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.clients),
           "--verify", "none", "--model-name", "m", "--threads", str(threads), *extra]
    if ray:
        cmd += ["--replica-cpus", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server ({' '.join(extra) or 'single'}) exited with {proc.returncode}")
        try:
            r = httpx.post(base + "/v1/completions", timeout=30,
                           json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
            if r.status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"no answer within {args.startup_timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def one_turn(client: httpx.AsyncClient, args: argparse.Namespace, messages: list[dict[str, str]] | list[int],
                   session: str) -> tuple[bool, float, int, str, str]:
    """``(ok, ttft_s, completion tokens, answer text, replica)`` of one streamed chat turn (or, with token ids,
    one streamed completion)."""
    body = {"model": "m", "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if args.token_ids:
        body["prompt"], path = messages, "/v1/completions"
    else:
        body["messages"], path = messages, "/v1/chat/completions"
    t0 = time.perf_counter()
    ttft, tokens, parts, done, replica = None, 0, [], False, ""
    try:
        async with client.stream("POST", path, json=body,
                                 headers={"x-session-id": session}) as r:
            replica = r.headers.get("x-glm-replica", "")
            if r.status_code != 200:
                ERRORS[f"HTTP {r.status_code}: {(await r.aread())[:160].decode(errors='replace')}"] += 1
                return False, 0.0, 0, "", replica
            async for data in sse_events(r):
                if data is None:
                    done = True
                    break
                if "error" in data:
                    ERRORS[f"stream error event: {str(data['error'].get('message'))[:160]}"] += 1
                    return False, 0.0, 0, "", replica
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                for c in data.get("choices", []):
                    piece = c.get("delta", {}).get("content") or c.get("text") or ""
                    if ttft is None and piece:  # the first text, not the chat stream's opening role chunk
                        ttft = time.perf_counter() - t0
                    parts.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        ERRORS[f"{type(e).__name__}: {str(e)[:160]}"] += 1
        return False, 0.0, 0, "", replica
    if not done:
        ERRORS["stream ended without [DONE]"] += 1
    return done and ttft is not None, ttft or 0.0, tokens, "".join(parts), replica


async def load(args: argparse.Namespace, base: str) -> dict[str, float]:
    limits = httpx.Limits(max_connections=args.clients + 4)
    results: list[tuple[int, bool, float, int, bool | None]] = []  # turn, ok, ttft, tokens, same replica
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout, limits=limits) as client:
        stop_at = time.perf_counter() + args.duration

        async def worker(i: int) -> None:
            rng = random.Random(i)
            conv = 0
            while time.perf_counter() < stop_at:
                conv += 1
                session = f"client{i}-conv{conv}"
                messages: list[Any] = [{"role": "system", "content": " ".join(rng.choices(WORDS, k=args.system_words))}]
                ids = [rng.randrange(VOCAB) for _ in range(args.system_words)]
                last = None
                for turn in range(args.turns):
                    if time.perf_counter() >= stop_at:
                        break
                    messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=args.user_words))})
                    ids = ids + [rng.randrange(VOCAB) for _ in range(args.user_words)]
                    ok, ttft, tokens, text, replica = await one_turn(client, args, ids if args.token_ids else messages,
                                                                     session)
                    same = None if last is None or not replica else replica == last
                    results.append((turn, ok, ttft, tokens, same))
                    if not ok:
                        break
                    last = replica
                    messages.append({"role": "assistant", "content": text})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r[1]]
    later = [r for r in ok if r[0] > 0]
    same = [r[4] for r in later if r[4] is not None]
    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r[3] for r in ok) / wall,
            "ttft_p50_ms": 1e3 * percentile([r[2] for r in ok], 50),
            "ttft_p99_ms": 1e3 * percentile([r[2] for r in ok], 99),
            "ttft_later_p50_ms": 1e3 * percentile([r[2] for r in later], 50),
            "ttft_later_p99_ms": 1e3 * percentile([r[2] for r in later], 99),
            "affinity": sum(same) / len(same) if same else float("nan")}


PREFIX_METRICS = ("glm_prefix_cache_queries_total", "glm_prefix_cache_hits_total",
                  "glm_prefix_cache_saved_tokens_total", "glm_prompt_tokens_total")


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def replica_counters(base: str, replicas: int) -> dict[str, dict[str, float]]:
    """The prefix-cache counters of every replica (``/metrics`` answers for the replica it lands on: ask with
    fresh session ids until each replica has answered)."""
    out: dict[str, dict[str, float]] = {}
    for i in range(60):
        r = httpx.get(base + "/metrics", headers={"x-session-id": f"metrics-{i}-{random.random()}"}, timeout=30)
        out[r.headers.get("x-glm-replica", "single")] = {m: metric(r.text, m) for m in PREFIX_METRICS}
        if len(out) >= replicas:
            break
    return out


def prefix_rates(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    """Hit rate (sequences that reused cached K/V) and token hit rate (prompt tokens not prefilled), summed over
    the replicas, for the load window; NaN when the scheduler has no prefix cache."""
    d = {m: sum(after[r][m] - before.get(r, {}).get(m, 0.0) for r in after) for m in PREFIX_METRICS}
    q, p = d["glm_prefix_cache_queries_total"], d["glm_prompt_tokens_total"]
    return {"prefix_hit_rate": d["glm_prefix_cache_hits_total"] / q if q else float("nan"),
            "prefix_token_hit_rate": d["glm_prefix_cache_saved_tokens_total"] / p if q and p else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--configs", default="single,ray1,ray2-pow2,ray2-affinity",
                    help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds during which turns start")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--system-words", type=int, default=200)
    ap.add_argument("--user-words", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads in all (split over replicas)")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--token-ids", action="store_true",
                    help="/v1/completions with token-id prompts (artifacts without a tokenizer): each turn's prompt "
                         "is the previous one plus --user-words new ids (the answers are not appended)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.configs.split(","):
        extra = CONFIGS[name]
        replicas = int(extra[extra.index("--replicas") + 1]) if "--ray" in extra else 1
        proc, base = start(args, extra)
        try:
            counters = replica_counters(base, replicas)
            cpu0, _ = cpu_and_rss(proc.pid)
            stats = asyncio.run(load(args, base))
            cpu1, rss = cpu_and_rss(proc.pid)
            stats.update(prefix_rates(counters, replica_counters(base, replicas)))
        finally:
            stop(proc)
        stats["error_kinds"] = dict(ERRORS)
        ERRORS.clear()
        done = stats["requests"] - stats["errors"]
        stats.update(config=name, cpu_s=cpu1 - cpu0, cpu_ms_per_request=1e3 * (cpu1 - cpu0) / max(done, 1),
                     cpu_util=(cpu1 - cpu0) / stats["wall_s"], rss_gb=rss / 1e9)
        rows.append(stats)
        if args.json:
            print(json.dumps(stats), flush=True)
    print(f"\n{args.clients} clients x {args.duration:.0f} s, {args.turns}-turn conversations, "
          f"{args.max_tokens} tokens per answer, {args.threads} threads in all\n")
    print("| config | requests | errors | req/s | tok/s | TTFT p50 / p99 (ms) | TTFT turns>=2 p50 / p99 (ms) "
          "| affinity | prefix-cache hit rate (seq / tokens) | server CPU ms/request | CPU cores busy | RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in rows:
        print(f"| {s['config']} | {s['requests']} | {s['errors']} | {s['req_per_s']:.2f} | {s['tok_per_s']:.1f} | "
              f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | {s['ttft_later_p50_ms']:.0f} / "
              f"{s['ttft_later_p99_ms']:.0f} | {s['affinity']:.2f} | {s['prefix_hit_rate']:.2f} / "
              f"{s['prefix_token_hit_rate']:.2f} | {s['cpu_ms_per_request']:.0f} | "
              f"{s['cpu_util']:.2f} | {s['rss_gb']:.2f} |")
    for s in rows:
        if s["error_kinds"]:
            print(f"\n{s['config']} errors: {s['error_kinds']}")


if __name__ == "__main__":
    main()
