"""``glm-runtime``: generate and chat from an artifact directory. Errors become one red line, not a traceback.

Text goes to stdout (JSON with ``--json``); progress, the KV-cache arithmetic and timings go to stderr, so
the output can be piped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from functools import wraps
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from glm_runtime.cpu_kernel import HUGEPAGES_ENV

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run GLM-4 artifacts made by glm-export (ONNX Runtime; no torch).")
console = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])


class Verify(str, Enum):
    hash = "hash"
    size = "size"
    none = "none"


def friendly_errors(fn: F) -> F:
    """The runtime's errors are ValueErrors whose message says what to do: print that, exit 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            # escape: messages quote things like [gMASK] or 'glm-runtime[server]' that rich would eat as markup
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, markup=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only on stderr.")] = False,
         ) -> None:
    logger = logging.getLogger("glm_runtime")
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# ---- options shared by the commands ------------------------------------------------------------------
Artifact = Annotated[Path, typer.Argument(help="Artifact directory made by glm-export (has manifest.json).")]
MaxNew = Annotated[int | None, typer.Option(help="Tokens to generate at most (default: generation_config.json, "
                                                 "else 512, capped by the context).")]
Temperature = Annotated[float | None, typer.Option(help="0 = greedy. Default: generation_config.json.")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling mass (default: generation_config.json).")]
TopK = Annotated[int | None, typer.Option(help="Sample among the k best (0 = off; default 50 as transformers).")]
RepPenalty = Annotated[float | None, typer.Option(help="transformers-style repetition penalty (1 = off).")]
Seed = Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same sampled text.")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop when the text contains this (repeatable).")]
Threads = Annotated[int | None, typer.Option(help="Intra-op threads (default: ONNX Runtime's, one per core).")]
Provider = Annotated[list[str] | None, typer.Option(
    "--provider", help="ONNX Runtime execution provider, in order of preference (repeatable; default: "
                       "TensorRT/CUDA when a GPU and onnxruntime-gpu are present, else CPU).")]
VerifyOpt = Annotated[Verify, typer.Option(help="Check the artifact's files: sha256, sizes only, or not at all.")]
PrefillChunk = Annotated[int, typer.Option(help="Prefill long prompts in chunks of this many tokens.")]
Budget = Annotated[float | None, typer.Option(help="Memory (GB) KV caches may use (default: 80% of available RAM).")]


class Int4Kernel(str, Enum):
    auto = "auto"
    ort = "ort"


Int4KernelOpt = Annotated[Int4Kernel | None, typer.Option(
    help="int4 artifacts on CPU: the runtime's kernel (auto, when built) or ONNX Runtime's MatMulNBits (ort). "
         "Default: $GLM_RUNTIME_INT4_KERNEL, else auto.")]
AttentionKernelOpt = Annotated[Int4Kernel | None, typer.Option(
    help="Attention on CPU: the runtime's (auto: on AVX-512 and AVX2 CPUs; its cost follows the context, not the KV "
         "buffer) or ONNX Runtime's (ort). Default: $GLM_RUNTIME_ATTENTION_KERNEL, else auto.")]
HugepagesOpt = Annotated[bool | None, typer.Option(
    "--hugepages/--no-hugepages", show_default=False,
    help="int4 artifacts on CPU: copy the weights onto transparent huge pages in the background after loading "
         "(decode ~11 % faster once done, slower while it copies; serve waits for it before listening; "
         "docs/runtime.md, \"Huge pages\"). Default: $GLM_RUNTIME_HUGEPAGES, else on (off for generate).")]
Truncate = Annotated[bool, typer.Option(help="Drop the oldest prompt tokens when prompt + max-new-tokens "
                                             "exceeds the context (default: refuse).")]


def _settle(llm: Any) -> None:
    """A server waits for the int4 weights to reach their huge pages before it listens, so its first requests
    do not share the cores with the copy (docs/runtime.md, "Huge pages")."""
    settle = getattr(llm.engine, "settle", None)
    if settle is not None and getattr(llm.engine, "hugepages", False):
        with console.status("moving the int4 weights onto huge pages"):
            waited = settle()
        if waited > 0.5:
            console.print(f"int4 weights on huge pages after {waited:.1f} s")


def _load(artifact: Path, threads: int | None, provider: list[str] | None, verify: Verify, prefill_chunk: int,
          kv_budget_gb: float | None, int4_kernel: Int4Kernel | None = None,
          attention_kernel: Int4Kernel | None = None, hugepages: bool | None = None) -> Any:
    from glm_runtime.api import load

    budget = int(kv_budget_gb * 1e9) if kv_budget_gb is not None else None
    with console.status(f"loading {artifact}"):
        return load(artifact, providers=provider or None, threads=threads, verify=verify.value,
                    prefill_chunk=prefill_chunk, kv_budget_bytes=budget,
                    int4_kernel=int4_kernel.value if int4_kernel is not None else None,
                    attention_kernel=attention_kernel.value if attention_kernel is not None else None,
                    hugepages=hugepages)


def _summary(done: Any) -> str:
    t = done.timings
    return (f"[{done.finish_reason} · {t['prompt_tokens']} prompt tokens ({t['reused_tokens']} reused) · "
            f"{t['generated_tokens']} generated · TTFT {t['ttft_s'] * 1e3:.0f} ms · "
            f"{t['decode_tokens_per_s']:.1f} tok/s]")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers like 5,17,300, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty: give at least one token id")
    return ids


def _read_messages(path: Path) -> tuple[list[Any], list[Any] | None]:
    """A JSON list of OpenAI-style messages, or an object with ``messages`` (and optionally ``tools``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if isinstance(data, dict):
        return data.get("messages"), data.get("tools")  # type: ignore[return-value]
    return data, None


@app.command()
@friendly_errors
def generate(
    artifact: Artifact,
    prompt: Annotated[str | None, typer.Option(help="Text prompt; sent as a user message through the chat "
                                                    "template unless --raw.")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Raw token ids, e.g. 5,17,300: nothing is added.")] = None,
    messages: Annotated[Path | None, typer.Option(help="JSON file: OpenAI-style message list (or "
                                                       "{messages, tools}).")] = None,
    raw: Annotated[bool, typer.Option(help="Continue --prompt as plain text ([gMASK]<sop> + text), no chat "
                                           "template.")] = False,
    max_new_tokens: MaxNew = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    repetition_penalty: RepPenalty = None,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: Annotated[bool, typer.Option(help="Don't stop at the model's stop ids (benchmarks).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object: prompt_ids, output_ids, text, "
                                                          "finish_reason, timings.")] = False,
    truncate: Truncate = False,
    threads: Threads = None,
    provider: Provider = None,
    verify: VerifyOpt = Verify.hash,
    prefill_chunk: PrefillChunk = 512,
    kv_budget_gb: Budget = None,
    int4_kernel: Int4KernelOpt = None,
    attention_kernel: AttentionKernelOpt = None,
    hugepages: HugepagesOpt = None,
) -> None:
    """Generate one answer (streamed to stdout, or as JSON)."""
    given = [name for name, v in (("--prompt", prompt), ("--prompt-ids", prompt_ids), ("--messages", messages))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --prompt, --prompt-ids, --messages (got {given or 'none'})")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    if hugepages is None and HUGEPAGES_ENV not in os.environ:
        hugepages = False  # one answer: the background copy would cost more than it saves (docs/runtime.md)
    llm = _load(artifact, threads, provider, verify, prefill_chunk, kv_budget_gb, int4_kernel, attention_kernel,
                hugepages)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "repetition_penalty": repetition_penalty, "seed": seed, "stop": stop, "truncate": truncate}
    if ids is not None:
        if llm.tokenizer is None and not json_out:
            console.print("[yellow]note:[/] this artifact has no tokenizer: output is token ids (text in/out "
                          "needs a tokenizer)")
        stream = llm.generate(prompt_ids=ids, stream=True, stop_token_ids=() if ignore_eos else None, **sampling)
    elif messages is not None:
        msgs, tools = _read_messages(messages)
        stream = llm.chat(msgs, tools=tools, stream=True, reuse_cache=False, **sampling)
    elif raw:
        stream = llm.generate(prompt, stream=True, stop_token_ids=() if ignore_eos else None, **sampling)
    else:
        stream = llm.chat([{"role": "user", "content": prompt}], stream=True, reuse_cache=False, **sampling)
    done = None
    for chunk in stream:
        if not json_out:
            _write(chunk.text if llm.tokenizer is not None else ",".join(map(str, chunk.token_ids)) + ",")
        done = chunk.completion or done
    assert done is not None
    if json_out:
        sys.stdout.write(json.dumps(done.to_dict(), ensure_ascii=False) + "\n")
    else:
        _write("\n")
        if done.tool_calls:
            _write(json.dumps(done.tool_calls, ensure_ascii=False, indent=2) + "\n")
        console.print(_summary(done), style="dim", markup=False)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@contextmanager
def _interrupt_flag() -> Iterator[threading.Event]:
    """Ctrl-C sets the flag (the answer stops at the next token); a second Ctrl-C interrupts right away."""
    flag = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield flag
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@app.command()
@friendly_errors
def chat(
    artifact: Artifact,
    system: Annotated[str | None, typer.Option(help="System message opening the conversation.")] = None,
    max_new_tokens: MaxNew = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    repetition_penalty: RepPenalty = None,
    seed: Seed = None,
    stop: Stop = None,
    threads: Threads = None,
    provider: Provider = None,
    verify: VerifyOpt = Verify.hash,
    prefill_chunk: PrefillChunk = 512,
    kv_budget_gb: Budget = None,
    int4_kernel: Int4KernelOpt = None,
    attention_kernel: AttentionKernelOpt = None,
    hugepages: HugepagesOpt = None,
) -> None:
    """Interactive multi-turn chat, streamed. /reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops an answer.

    Each turn reuses the conversation's KV cache: only the new message is prefilled.
    """
    llm = _load(artifact, threads, provider, verify, prefill_chunk, kv_budget_gb, int4_kernel, attention_kernel,
                hugepages)
    if llm.tokenizer is None:
        raise ValueError(f"{artifact} has no tokenizer, and chat is text in, text out; use "
                         f"`glm-runtime generate {artifact} --prompt-ids ...` with token ids")
    tty = sys.stdin.isatty()
    opening = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, Any]] = list(opening)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "repetition_penalty": repetition_penalty, "seed": seed, "stop": stop}
    if tty:
        console.print("[dim]chat with the model; /reset starts over, /exit quits, Ctrl-C stops an answer[/]")
    while True:
        try:
            line = console.input("[bold green]you>[/] ") if tty else input()
        except (EOFError, KeyboardInterrupt):
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(opening)
            llm.reset()
            console.print("[dim](conversation reset)[/]")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        if tty:
            console.print("[bold blue]glm>[/] ", end="")
        parts: list[str] = []
        done = None
        with _interrupt_flag() as interrupted:
            stream = llm.chat(history, stream=True, **sampling)
            try:
                for chunk in stream:
                    _write(chunk.text)
                    parts.append(chunk.text)
                    done = chunk.completion or done
                    if interrupted.is_set():
                        break
            except KeyboardInterrupt:
                interrupted.set()
            finally:
                stream.close()
        _write("\n")
        if done is not None:
            history.append(done.message)
            console.print(_summary(done), style="dim", markup=False)
        else:  # interrupted: keep what was said, so the next turn still reuses the cache
            history.append({"role": "assistant", "content": "".join(parts)})
            console.print("[interrupted]", style="dim", markup=False)


@app.command()
@friendly_errors
def info(artifact: Artifact, verify: VerifyOpt = Verify.size) -> None:
    """What an artifact holds: model shape, precision, files, tokenizer, KV memory per token."""
    from glm_runtime.engine import format_bytes
    from glm_runtime.manifest import model_config, read_manifest

    manifest = read_manifest(artifact, verify=verify.value)
    cfg = model_config(manifest)
    dtype = manifest.get("dtype", cfg.dtype)
    per_token = cfg.kv_cache_bytes_per_token(dtype)
    total = sum(f["bytes"] for f in manifest.get("files", {}).values())
    rows = [
        ("model", f"GLM-4, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads / "
                  f"{cfg.num_kv_heads} KV groups, vocab {cfg.vocab_size}, {cfg.num_parameters() / 1e9:.2f} B params"),
        ("precision", f"{manifest.get('precision')} ({dtype})"),
        ("context", f"{cfg.max_position} tokens"),
        ("KV cache", f"{format_bytes(per_token)}/token ({dtype}); {format_bytes(per_token * cfg.max_position)} "
                     f"for one full-context sequence"),
        ("tokenizer", "yes" if manifest.get("tokenizer") else "no (token ids only: --prompt-ids)"),
        ("files", f"{len(manifest.get('files', {}))}, {format_bytes(total)}"),
        ("made by", json.dumps(manifest.get("producer", {}))),
    ]
    for key, value in rows:
        sys.stdout.write(f"{key:>10}: {value}\n")


@app.command()
@friendly_errors
def env(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """What a bug report needs: versions, CPU and its ISA extensions, execution providers, GPU, free RAM/disk."""
    from glm_runtime import hostinfo

    info = hostinfo.collect()
    sys.stdout.write((json.dumps(info, indent=2) if as_json else hostinfo.render(info)) + "\n")


@app.command()
@friendly_errors
def serve(
    artifact: Artifact,
    host: Annotated[str, typer.Option(help="Address to listen on. Loopback by default: exposing the server is an "
                                           "explicit choice (then use --api-key-file).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the API key clients must send as "
                                                           "'Authorization: Bearer KEY'.")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Sequences decoded together (rows of the KV pool).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Sequences that may wait for a row; beyond that: HTTP 429.")] = 32,
    max_model_len: Annotated[int | None, typer.Option(help="Longest sequence (prompt + max_tokens) served "
                                                           "(default: the model's context, as the KV budget "
                                                           "allows for --max-concurrency rows).")] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (HTTP 413 beyond).")] = 1 << 20,
    model_name: Annotated[str | None, typer.Option(help="Model id clients use (default: the artifact "
                                                        "directory's name).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on "
                                                         "SIGTERM/SIGINT before they are cancelled.")] = 30.0,
    max_connections: Annotated[int | None, typer.Option(help="Open connections (default: up to 1000, as the "
                                                              "open-files limit allows); past it idle ones are "
                                                              "closed first.")] = None,
    head_timeout: Annotated[float, typer.Option(help="Seconds a connection has to send a complete request head "
                                                     "(after connecting or after its previous response).")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request has to send its whole body (HTTP 408 "
                                                     "beyond).")] = 30.0,
    send_timeout: Annotated[float, typer.Option(help="Seconds writes to a client may stay blocked (it stopped "
                                                     "reading) before it is disconnected.")] = 60.0,
    threads: Threads = None,
    provider: Provider = None,
    verify: VerifyOpt = Verify.hash,
    prefill_chunk: PrefillChunk = 512,
    kv_budget_gb: Budget = None,
    int4_kernel: Int4KernelOpt = None,
    attention_kernel: AttentionKernelOpt = None,
    hugepages: HugepagesOpt = None,
    ray: Annotated[bool, typer.Option("--ray", help="Serve through Ray Serve (replicas, autoscaling, replacement "
                                                     "of failed replicas; pip install 'glm-runtime[ray]'). "
                                                     "docs/scale-out.md.")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: replicas, each with its own engine.")] = 1,
    autoscale: Annotated[str | None, typer.Option(help="With --ray: MIN:MAX replicas, scaled on ongoing "
                                                       "requests (target: --max-concurrency per replica).")] = None,
    router: Annotated[str, typer.Option(help="With --ray: 'affinity' (the turns of one x-session-id go to one "
                                             "replica) or 'pow2' (Serve's default).")] = "affinity",
    ray_address: Annotated[str | None, typer.Option(help="With --ray: join this Ray cluster ('auto': the local "
                                                         "one) instead of starting Ray here.")] = None,
    replica_cpus: Annotated[float | None, typer.Option(help="With --ray: CPUs Ray reserves per replica "
                                                            "(default: --threads, else 1).")] = None,
    prefix_cache_gb: Annotated[float | None, typer.Option(
        help="Bound of the automatic prefix cache (K/V of earlier requests' prompts and answers, reused by any "
             "request that starts with the same tokens); 0 turns it off. Default: what the KV budget leaves "
             "beside the pool.")] = None,
) -> None:
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)
    with continuous batching. Stops gracefully on SIGTERM."""
    if ray:
        _serve_ray(artifact, host, port, api_key_file, max_concurrency, max_queue, max_model_len, max_tokens_limit,
                   max_body_bytes, model_name, shutdown_timeout, threads, provider, verify, prefill_chunk,
                   kv_budget_gb, replicas, autoscale, router, ray_address, replica_cpus, prefix_cache_gb,
                   body_timeout, int4_kernel, attention_kernel, hugepages)
        return
    try:
        from glm_runtime import server
    except ImportError as e:
        raise ValueError(f"the server needs {e.name or 'fastapi and uvicorn'}, which is not installed: "
                         f"pip install 'glm-runtime[server]'") from None
    from glm_runtime.scheduler import Scheduler

    key = server.read_api_key(api_key_file) if api_key_file is not None else None
    llm = _load(artifact, threads, provider, verify, prefill_chunk, kv_budget_gb, int4_kernel, attention_kernel,
                hugepages)
    _settle(llm)
    scheduler = Scheduler(llm.engine, max_concurrency=max_concurrency, max_queue=max_queue,
                          prefill_chunk=prefill_chunk, kv_budget_bytes=llm.generator.kv_budget_bytes,
                          max_cache_len=max_model_len,
                          prefix_cache_bytes=int(prefix_cache_gb * 1e9) if prefix_cache_gb is not None else None)
    name = model_name or artifact.resolve().name
    if min(head_timeout, body_timeout, send_timeout) <= 0 or (max_connections is not None and max_connections < 1):
        raise ValueError("--head-timeout, --body-timeout and --send-timeout must be > 0 s and --max-connections >= 1")
    limits = server.Limits(head_timeout=head_timeout, body_timeout=body_timeout, send_timeout=send_timeout,
                           max_connections=max_connections)
    settings = server.ServerSettings(name, key, max_body_bytes, max_tokens_limit, limits=limits)
    console.print(f"serving [bold]{escape(name)}[/] on http://{host}:{port}/v1 ({max_concurrency} concurrent "
                  f"sequences, up to {scheduler.max_cache_len} tokens each; {scheduler.plan.arithmetic()})",
                  soft_wrap=True)
    server.serve(llm, scheduler, settings, host, port, shutdown_timeout)


def _serve_ray(artifact: Path, host: str, port: int, api_key_file: Path | None, max_concurrency: int, max_queue: int,
               max_model_len: int | None, max_tokens_limit: int, max_body_bytes: int, model_name: str | None,
               shutdown_timeout: float, threads: int | None, provider: list[str] | None, verify: Verify,
               prefill_chunk: int, kv_budget_gb: float | None, replicas: int, autoscale: str | None, router: str,
               ray_address: str | None, replica_cpus: float | None, prefix_cache_gb: float | None,
               body_timeout: float, int4_kernel: Int4Kernel | None = None,
               attention_kernel: Int4Kernel | None = None, hugepages: bool | None = None) -> None:
    """``serve --ray``: the same app on Ray Serve (glm_runtime.ray_app, imported only here: ray is optional).
    The connection-level options (--max-connections, --head-timeout, --send-timeout) are Ray's proxy's there
    (docs/reliability.md); the in-app ones (--body-timeout, request slots) hold in every replica."""
    try:
        from glm_runtime import ray_app
    except ImportError as e:
        raise ValueError(f"--ray needs {e.name or 'ray[serve]'}, which is not installed: "
                         f"pip install 'glm-runtime[ray]'") from None
    from glm_runtime.server import LOOPBACK, read_api_key

    if api_key_file is not None:
        read_api_key(api_key_file)  # refuse a bad key file here, not in every replica
    elif host not in LOOPBACK:
        console.print(f"[yellow]listening on {escape(host)} without an API key: anyone who can reach this port "
                      f"can use the model (--api-key-file)[/]")
    cfg = ray_app.ReplicaConfig(str(artifact.resolve()), model_name or artifact.resolve().name,
                                str(api_key_file.resolve()) if api_key_file is not None else None, max_concurrency,
                                max_queue, max_model_len, max_tokens_limit, max_body_bytes, threads, provider,
                                verify.value, prefill_chunk, kv_budget_gb, prefix_cache_gb, body_timeout,
                                int4_kernel.value if int4_kernel is not None else None,
                                attention_kernel.value if attention_kernel is not None else None, hugepages)
    scale = ray_app.parse_autoscale(autoscale)
    ray_app.deployment_options(cfg, replicas, scale, router)  # bad flags fail before Ray starts
    what = f"{scale[0]}-{scale[1]} replicas (autoscaled)" if scale else f"{replicas} replica(s)"
    console.print(f"serving [bold]{escape(cfg.model_name or '')}[/] on http://{host}:{port}/v1 through Ray Serve: "
                  f"{what}, {router} routing, {max_concurrency} concurrent sequences each", soft_wrap=True)
    ray_app.run(cfg, host, port, ray_address, replica_cpus, replicas=replicas, autoscale=scale, router=router,
                shutdown_timeout=shutdown_timeout)
