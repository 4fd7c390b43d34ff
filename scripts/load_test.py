"""Load test for ``glm-runtime serve``: N concurrent streaming clients for M seconds on loopback.

    python scripts/load_test.py ARTIFACT --clients 8 --duration 60 [--max-tokens 64] [--prompt-tokens 32]
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid PID ...      # a server you started
    python scripts/load_test.py ARTIFACT --idle-sockets 500                     # ... while 500 idle sockets are held

By default it starts the server itself (``glm-runtime serve ARTIFACT`` on a free loopback port, in its own
process so the RSS measured is the server's alone), warms it up, then runs the clients: each sends streaming
``/v1/completions`` requests back to back with a random token-id prompt (works for artifacts without a
tokenizer, e.g. glm-4-9b-2layer) and ``ignore_eos`` (every request generates ``--max-tokens``). After M seconds
no new request starts; requests in flight finish and count. Then the server gets SIGTERM and must exit 0.

``--idle-sockets N`` plays an idle-connection attacker during the load: N sockets that connect and send nothing
(``--idle-kind partial``: half a request head), each reopened as soon as the server closes it, held until the
clients finish; meanwhile ``GET /health`` is probed every 0.5 s. Their counts (connections made, closed by the
server, failed health probes) are printed too.

Multi-turn mode (``--turns N``): each client holds chat conversations of N turns through
``/v1/chat/completions`` (needs a tokenizer): every turn sends the whole history (earlier user messages of
``--prompt-tokens`` random words and the answers the server gave) plus a new user message, as chat clients do.
It prints TTFT per turn (mean and p50 over clients and conversations), prompt tokens and the tokens the server
reports as cached (``usage.prompt_tokens_details.cached_tokens``). Run it against a server with
``--server-arg=--prefix-cache-gb --server-arg=0`` for the uncached baseline.

Prints one markdown table: requests/s, generated tokens/s, time to first token p50/p99, inter-token p50,
errors (non-200, broken streams, missing ``[DONE]``), mean decode batch (from ``/metrics``), server RSS before
(after warm-up) and after, peak RSS, and the KV pool's bound: RSS growth must stay under that bound.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of ``pid`` (``VmHWM``: the peak) from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def sse_events(r: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON events of a streamed (SSE) answer, then ``None`` for its final ``data: [DONE]``."""
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            yield None
            return
        yield json.loads(line[6:])


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, rng: random.Random,
                      vocab: int) -> tuple[bool, float, int, list[float]]:
    """``(ok, ttft_s, generated tokens, gaps between tokens)`` of one streaming request."""
    body = {"model": args.model, "prompt": [rng.randrange(vocab) for _ in range(args.prompt_tokens)],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, last, gaps, tokens, done = None, None, [], 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return False, 0.0, 0, []
            async for data in sse_events(r):
                if data is None:
                    done = True
                    break
                if "error" in data:
                    return False, 0.0, 0, []
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError):
        return False, 0.0, 0, []
    return done and ttft is not None and tokens == args.max_tokens, ttft or 0.0, tokens, gaps


async def hold_idle_sockets(base: str, n: int, kind: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Keep ``n`` connections open that send nothing (or half a request head), reopening each one the server
    closes, until ``stop`` is set."""
    host, port = base.rsplit("//", 1)[1].rsplit(":", 1)

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                counts["connect_failed"] += 1
                await asyncio.sleep(0.1)
                continue
            counts["opened"] += 1
            if kind == "partial":
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            try:
                read = asyncio.ensure_future(reader.read(1))
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if read.done():
                    counts["closed_by_server"] += 1
                read.cancel()
                stopped.cancel()
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(n)))


async def probe_health(base: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while not stop.is_set():
            try:
                ok = (await client.get("/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            counts["health_probes"] += 1
            counts["health_failed"] += not ok
            await asyncio.sleep(0.5)


WORDS = ("time people year way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force "
         "education").split()


async def one_turn(client: httpx.AsyncClient, args: argparse.Namespace,
                   messages: list[dict[str, str]]) -> tuple[bool, float, str, int, int]:
    """``(ok, ttft_s, answer, prompt tokens, cached prompt tokens)`` of one streamed chat turn."""
    body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, parts, usage, done = None, [], {}, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return False, 0.0, "", 0, 0
            async for data in sse_events(r):
                if data is None:
                    done = True
                    break
                if "error" in data:
                    return False, 0.0, "", 0, 0
                usage = data.get("usage") or usage
                for choice in data.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        parts.append(text)
    except (httpx.HTTPError, json.JSONDecodeError):
        return False, 0.0, "", 0, 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return done and ttft is not None, ttft or 0.0, "".join(parts), usage.get("prompt_tokens", 0), cached


async def run_turns(args: argparse.Namespace, base: str) -> dict[str, object]:
    """Conversations of ``args.turns`` turns per client until ``args.duration`` has passed (at least one each)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    per_turn: list[list[tuple[float, int, int]]] = [[] for _ in range(args.turns)]
    errors = 0
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=args.timeout, limits=limits) as client:
        stop_at = time.perf_counter() + args.duration

        async def worker(i: int) -> None:
            nonlocal errors
            rng = random.Random(i)
            first = True
            while first or time.perf_counter() < stop_at:
                first = False
                messages = [{"role": "system", "content": "You are a helpful assistant."}]
                for t in range(args.turns):
                    messages.append({"role": "user", "content": " ".join(rng.choice(WORDS)
                                                                         for _ in range(args.prompt_tokens))})
                    ok, ttft, answer, prompt, cached = await one_turn(client, args, messages)
                    if not ok:
                        errors += 1
                        break
                    per_turn[t].append((ttft, prompt, cached))
                    messages.append({"role": "assistant", "content": answer})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.clients)))
        wall = time.perf_counter() - t0
    rows = []
    for t, results in enumerate(per_turn):
        ttfts = [r[0] for r in results]
        rows.append({"turn": t + 1, "n": len(results), "ttft_mean_ms": 1e3 * sum(ttfts) / max(1, len(ttfts)),
                     "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
                     "prompt_tokens": sum(r[1] for r in results) / max(1, len(results)),
                     "cached_tokens": sum(r[2] for r in results) / max(1, len(results))})
    return {"turns": rows, "errors": errors, "wall_s": wall}


async def run_load(args: argparse.Namespace, base: str, vocab: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    stop = asyncio.Event()
    counts = dict.fromkeys(("opened", "closed_by_server", "connect_failed", "health_probes", "health_failed"), 0)
    background = []
    if args.idle_sockets:
        background = [asyncio.ensure_future(hold_idle_sockets(base, args.idle_sockets, args.idle_kind, stop,
                                                              counts)),
                      asyncio.ensure_future(probe_health(base, stop, counts))]
        while counts["opened"] < args.idle_sockets:  # all held before the clients start
            await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=args.timeout, limits=limits) as client:
        results: list[tuple[bool, float, int, list[float]]] = []
        stop_at = time.perf_counter() + args.duration

        async def worker(i: int) -> None:
            rng = random.Random(i)
            while time.perf_counter() < stop_at:
                results.append(await one_request(client, args, rng, vocab))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.clients)))
        wall = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*background)
    ok = [r for r in results if r[0]]
    ttfts = [r[1] for r in ok]
    gaps = [g for r in ok for g in r[3]]
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r[2] for r in ok) / wall,
            "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
            "itl_p50_ms": 1e3 * percentile(gaps, 50), **{f"idle_{k}": v for k, v in counts.items()}}


async def warm_up(base: str, headers: dict[str, str], args: argparse.Namespace, vocab: int) -> None:
    """One short request first: ONNX Runtime's first run of a shape allocates its arena (not a leak)."""
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=args.timeout) as client:
        await one_request(client, args, random.Random(-1), vocab)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-c", "from glm_runtime.cli import app; app()", "-q", "serve", str(args.artifact),
           "--port", str(port), "--max-concurrency", str(args.max_concurrency), "--max-queue",
           str(max(args.clients, 1)), "--verify", args.verify, "--model-name", args.model, *args.server_arg]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "runtime"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="?", type=Path, help="artifact to serve (omit with --url)")
    ap.add_argument("--url", help="an already running server (then --pid for the RSS columns)")
    ap.add_argument("--pid", type=int, help="the running server's process id (with --url)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which requests start")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-concurrency", type=int, default=8, help="server rows (when started here)")
    ap.add_argument("--threads", type=int, default=None, help="server intra-op threads (when started here)")
    ap.add_argument("--verify", default="size", choices=["hash", "size", "none"])
    ap.add_argument("--model", default="model", help="model name to serve / ask for")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for glm-runtime serve")
    ap.add_argument("--turns", type=int, default=1, help="multi-turn chat mode: turns per conversation (> 1)")
    ap.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    ap.add_argument("--idle-sockets", type=int, default=0, help="idle connections held open during the load")
    ap.add_argument("--idle-kind", choices=["silent", "partial"], default="silent",
                    help="idle sockets send nothing, or half a request head")
    args = ap.parse_args()
    if (args.artifact is None) == (args.url is None):
        ap.error("give an artifact to serve, or --url of a running server")

    proc = None
    if args.url:
        base, pid = args.url.rstrip("/"), args.pid
    else:
        proc, base = start_server(args)
        pid = proc.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(base + "/v1/models", headers=headers, timeout=10).json()["data"]
        args.model = models[0]["id"]
        vocab = 151000  # GLM-4's ordinary tokens are below 151329 (the specials); tiny shares the id space
        warm = argparse.Namespace(**{**vars(args), "max_tokens": 4})
        asyncio.run(warm_up(base, headers, warm, vocab))
        if args.turns > 1:
            turns = asyncio.run(run_turns(args, base))
            text = httpx.get(base + "/metrics", headers=headers, timeout=10).text
            turns["metrics"] = {name: metric(text, name) for name in (
                "glm_prefix_cache_hit_rate", "glm_prefix_cache_saved_tokens_total", "glm_prefill_tokens_total",
                "glm_prompt_tokens_total", "glm_prefix_cache_bytes")}
            print_turns(args, base, turns)
        else:
            before = rss(pid) if pid else 0
            stats = asyncio.run(run_load(args, base, vocab))
            after = rss(pid) if pid else 0
            peak = rss(pid, "VmHWM") if pid else 0
            text = httpx.get(base + "/metrics", headers=headers, timeout=10).text
            steps = metric(text, "glm_decode_steps_total")
            stats.update(mean_batch=metric(text, "glm_decode_rows_total") / steps if steps else 0.0,
                         kv_bound=metric(text, "glm_kv_pool_max_bytes"), rss_before=before, rss_after=after,
                         rss_peak=peak)
    finally:
        exit_code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.turns > 1:
        if turns["errors"] or (proc is not None and exit_code != 0):
            sys.exit(1)
        return
    stats["exit_code"] = exit_code if exit_code is not None else float("nan")
    gb = 1e9
    growth = stats["rss_after"] - stats["rss_before"]
    print(f"\n{args.clients} streaming clients x {args.duration:.0f} s, prompt {args.prompt_tokens} ids, "
          f"{args.max_tokens} tokens each, {args.artifact or base}\n")
    print("| req/s | tok/s | TTFT p50 | TTFT p99 | ITL p50 | requests | errors | mean batch | RSS before | RSS after "
          "| RSS peak | KV bound | SIGTERM exit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {stats['req_per_s']:.2f} | {stats['tok_per_s']:.1f} | {stats['ttft_p50_ms']:.0f} ms | "
          f"{stats['ttft_p99_ms']:.0f} ms | {stats['itl_p50_ms']:.1f} ms | {stats['requests']} | {stats['errors']} | "
          f"{stats['mean_batch']:.2f} | {stats['rss_before'] / gb:.3f} GB | {stats['rss_after'] / gb:.3f} GB | "
          f"{stats['rss_peak'] / gb:.3f} GB | {stats['kv_bound'] / gb:.3f} GB | {exit_code} |")
    if args.idle_sockets:
        print(f"\n{args.idle_sockets} idle sockets ({args.idle_kind}) held during the load: "
              f"{stats['idle_opened']} connections made, {stats['idle_closed_by_server']} closed by the server, "
              f"{stats['idle_connect_failed']} connects failed; /health probes: {stats['idle_health_probes']}, "
              f"failed {stats['idle_health_failed']}")
    verdict = "within" if growth <= stats["kv_bound"] else "BEYOND"
    print(f"\nRSS growth {growth / 1e6:+.1f} MB: {verdict} the KV pool bound ({stats['kv_bound'] / 1e6:.1f} MB)")
    if args.json:
        print(json.dumps(stats))
    failed = stats["errors"] or stats.get("idle_health_failed")
    if failed or (proc is not None and exit_code != 0) or verdict != "within":
        sys.exit(1)


def print_turns(args: argparse.Namespace, base: str, turns: dict[str, object]) -> None:
    print(f"\n{args.clients} clients x conversations of {args.turns} turns ({args.prompt_tokens} words per user "
          f"message, {args.max_tokens} tokens per answer), {args.artifact or base}, {turns['wall_s']:.0f} s, "
          f"{turns['errors']} errors\n")
    print("| turn | turns run | TTFT mean | TTFT p50 | prompt tokens | cached tokens |")
    print("|---|---|---|---|---|---|")
    for r in turns["turns"]:  # type: ignore[attr-defined]
        print(f"| {r['turn']} | {r['n']} | {r['ttft_mean_ms']:.0f} ms | {r['ttft_p50_ms']:.0f} ms | "
              f"{r['prompt_tokens']:.0f} | {r['cached_tokens']:.0f} |")
    print("\n/metrics: " + ", ".join(f"{k} {v:g}" for k, v in turns["metrics"].items()))  # type: ignore[union-attr]
    if args.json:
        print(json.dumps(turns))


if __name__ == "__main__":
    main()
