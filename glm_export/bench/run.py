"""``glm-export bench``: the runtime against PyTorch on the same weights, side by side, in one run.

Why this shape:

- Users adopt the artifact to be faster than PyTorch, so the PyTorch side is what a model-card user runs
  (transformers' ``GlmForCausalLM``, eager, same weights, same prompts, same threads), and every number is
  measured next to it on the same machine in the same run.
- Shared machines are noisy: sides alternate within every round (a fresh process per side and round,
  :mod:`glm_export.bench.worker`), and a ratio is the median of the per-round side-by-side ratios, which
  survives load that drifts over the run; absolute numbers are medians with their min-max spread.
- A fast but wrong runtime must not win: before any timing, the first greedy tokens of every runtime side are
  compared with PyTorch's. An fp32 artifact against fp32 PyTorch must match exactly (else it is not timed,
  shows no speed-up and the command fails); a quantized one reports how many tokens match.
- Decoding is bandwidth bound, so the report places every side on the roofline (:mod:`glm_export.bench.roofline`).

Outputs (each written atomically): ``bench.json`` (machine, versions, settings, raw samples, summary),
``bench.md``, ``bench.png`` (with matplotlib, the ``plot`` extra) and a table on the terminal.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from glm_export.bench.worker import case_key

SCHEMA = "glm-export-bench/1"
TORCH = "torch"


class BenchError(RuntimeError):
    """The benchmark cannot run (bad settings, a worker failed); the message says what to do."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    scale: float
    higher_is_better: bool
    digits: int


METRICS = (
    Metric("ttft_s", "time to first token", "ms", 1e3, False, 1),
    Metric("tpot_s", "time per output token", "ms", 1e3, False, 2),
    Metric("decode_tok_s", "decode tokens/s", "tok/s", 1.0, True, 2),
    Metric("prefill_tok_s", "prefill tokens/s", "tok/s", 1.0, True, 1),
    Metric("e2e_s", "end-to-end latency", "s", 1.0, False, 3),
    Metric("peak_rss_bytes", "peak RSS", "GB", 1e-9, False, 2),
    Metric("peak_gpu_bytes", "peak GPU memory", "GB", 1e-9, False, 2),
)


@dataclass
class Settings:
    artifacts: list[Path]
    model: Path | None = None
    batches: list[int] = field(default_factory=lambda: [1])
    prompt_lens: list[int] = field(default_factory=lambda: [128])
    new_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    torch_dtype: str | None = None  # None: the checkpoint's dtype on GPU, float32 on CPU (16-bit if fp32 won't fit)
    compile: bool = False
    attn: str = "eager"
    check_tokens: int = 16
    seed: int = 0
    out: Path = Path("bench")
    probe_gib: float = 1.0
    profile: bool = False
    command: str = ""
    torch_dtype_note: str = ""  # set by plan(): why PyTorch does not run in float32 on CPU (written into the report)


# ---- settings --------------------------------------------------------------------------------------------
def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,4"`` -> ``[1, 4]``; anything else is refused with the expected form."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise BenchError(f"{what} must be a comma-separated list of positive integers such as 1,4; got {text!r}")
    return list(dict.fromkeys(values))


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's memory pipes and vector units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


@dataclass
class Side:
    id: str
    kind: str  # "torch" | "runtime"
    label: str
    precision: str
    path: str
    strict: bool = False  # greedy tokens must equal PyTorch's (fp32 vs fp32)
    bytes_per_step_weights: int = 0
    kv_itemsize: int = 4


def plan(settings: Settings) -> tuple[list[Side], dict[str, Any]]:
    """Check the inputs before anything runs; return the sides and what the report needs to know."""
    from glm_export.bench.roofline import kv_itemsize, torch_weight_bytes_per_step, weight_bytes_per_step
    from glm_export.checkpoint import Checkpoint, CheckpointError
    from glm_runtime.manifest import read_manifest

    if not settings.artifacts:
        raise BenchError("give at least one artifact directory (made by glm-export build / export)")
    manifests = [read_manifest(a, verify="none") for a in settings.artifacts]
    if settings.model is None:
        source = manifests[0].get("source", {}).get("path")
        if not source:
            raise BenchError(f"{settings.artifacts[0]} does not record the checkpoint it was made from: pass "
                             f"--model DIR (the checkpoint the artifact was exported from)")
        settings.model = Path(source)
        if not settings.model.is_dir():
            raise BenchError(f"the artifact's source checkpoint {source} does not exist here: pass --model DIR "
                             f"(the checkpoint the artifact was exported from)")
    if not settings.model.is_dir():
        raise BenchError(f"checkpoint {settings.model} not found: --model must be the checkpoint directory the "
                         f"artifact was exported from")
    try:
        ckpt = Checkpoint(settings.model)
    except CheckpointError as e:
        raise BenchError(f"--model {settings.model}: {e}") from e
    cfg = ckpt.config
    shape_keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "ffn_hidden_size")
    for art, m in zip(settings.artifacts, manifests, strict=True):
        diff = [f"{k} {m['model'].get(k)} vs {getattr(cfg, k)}" for k in shape_keys
                if m["model"].get(k) != getattr(cfg, k)]
        if diff:
            raise BenchError(f"{art} was not exported from {settings.model} ({', '.join(diff)}): pass the "
                             f"checkpoint it was made from with --model")
    longest = max(settings.prompt_lens) + settings.new_tokens
    if longest > cfg.max_position:
        raise BenchError(f"prompt {max(settings.prompt_lens)} + {settings.new_tokens} new tokens exceeds the "
                         f"model's context of {cfg.max_position}")
    if settings.new_tokens < 2:
        raise BenchError("--new-tokens must be at least 2 (decode speed needs a step after the first token)")
    settings.threads = settings.threads or physical_cores()
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise BenchError("the PyTorch side runs transformers' GlmForCausalLM: pip install 'transformers>=4.46'")
    if _cuda_available():
        settings.torch_dtype = settings.torch_dtype or cfg.dtype
    else:
        from glm_runtime.engine import available_memory_bytes

        settings.torch_dtype, settings.torch_dtype_note = cpu_torch_dtype(
            cfg.num_parameters(), cfg.dtype, available_memory_bytes(), settings.torch_dtype)
    dtype_bytes = TORCH_DTYPE_BYTES[settings.torch_dtype]
    embed = cfg.vocab_size * cfg.hidden_size
    sides = [Side(TORCH, "torch", f"PyTorch {_short_dtype(settings.torch_dtype)}", settings.torch_dtype,
                  str(settings.model), bytes_per_step_weights=torch_weight_bytes_per_step(
                      cfg.num_parameters(), embed, dtype_bytes), kv_itemsize=dtype_bytes)]
    labels = [f"runtime {m['precision']}" for m in manifests]
    for i, (art, m, label) in enumerate(zip(settings.artifacts, manifests, labels, strict=True)):
        if labels.count(label) > 1:
            label = f"{label} ({art.name})"
        graph = art / m.get("graph", {}).get("file", "model.onnx")
        _, per_step = weight_bytes_per_step(graph)
        sides.append(Side(f"rt{i}", "runtime", label, m["precision"], str(art),
                          strict=m["precision"] == "fp32" and settings.torch_dtype == "float32",
                          bytes_per_step_weights=per_step, kv_itemsize=kv_itemsize(graph)))
    return sides, {"config": cfg}


TORCH_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def torch_rss_bytes(num_parameters: int, dtype: str) -> int:
    """Peak RSS of the PyTorch side, roughly: the weights in ``dtype`` plus 5% and 1 GiB for the interpreter,
    torch/transformers, activations and the KV cache of a bench run (weights are loaded tensor by tensor into a
    meta-device model, so there is no second copy)."""
    return int(num_parameters * TORCH_DTYPE_BYTES[dtype] * 1.05) + 2**30


def cpu_torch_dtype(num_parameters: int, checkpoint_dtype: str, available: int, requested: str | None
                    ) -> tuple[str, str]:
    """(dtype, note) of the PyTorch side on CPU. float32 is the reference, but a 9B model in float32 (~38 GB)
    does not fit on most machines that run the quantized artifact; then the checkpoint's own 16-bit dtype is
    used and the note (written into the report) says why.

    In the checkpoint's own dtype the weights are not copied: they stay memory-mapped from the safetensors
    files (``Checkpoint.tensor``), i.e. page cache the kernel can drop and re-read, never an OOM kill. Such a
    run is refused only when not even the rest (1 GiB) fits; when the weights do not fit in the available RAM
    the note says that pages may be re-read from disk during decode (slower than the machine can do). A dtype
    that needs a converted copy is refused up front when it does not fit: an OOM kill would take the machine's
    other jobs with it."""
    gib = 2**30

    def fits(dtype: str) -> tuple[bool, str]:
        need = torch_rss_bytes(num_parameters, dtype)
        if need <= available:
            return True, ""
        if dtype == checkpoint_dtype and 2**30 <= available:
            return True, (f"the {_short_dtype(dtype)} weights are memory-mapped from the checkpoint: about "
                          f"{need / gib:.1f} GiB with them, {available / gib:.1f} GiB available, so some pages are "
                          f"re-read from disk during decode (PyTorch is slower here than on a machine where they fit)")
        return False, ""

    if requested is not None:
        ok, note = fits(requested)
        if not ok:
            hint = "; try --dtype bf16" if requested == "float32" and fits("bfloat16")[0] else ""
            raise BenchError(f"the PyTorch side in {requested} needs about "
                             f"{torch_rss_bytes(num_parameters, requested) / gib:.1f} GiB of RAM, "
                             f"{available / gib:.1f} GiB is available{hint}")
        return requested, note
    need32 = torch_rss_bytes(num_parameters, "float32")
    if need32 <= available:
        return "float32", ""
    low = checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16") else "bfloat16"
    ok, mapped = fits(low)
    need16 = torch_rss_bytes(num_parameters, low)
    if not ok:
        raise BenchError(f"the PyTorch side needs about {need32 / gib:.1f} GiB of RAM in float32 and "
                         f"{need16 / gib:.1f} GiB in {low}; {available / gib:.1f} GiB is available: free memory "
                         f"or bench on a larger machine")
    note = (f"PyTorch runs in {_short_dtype(low)}, not float32: float32 would need about {need32 / gib:.1f} GiB "
            f"of RAM, {available / gib:.1f} GiB was available ({_short_dtype(low)}: about {need16 / gib:.1f} GiB)")
    return low, note + (f"; {mapped}" if mapped else "")


def _short_dtype(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# ---- running ---------------------------------------------------------------------------------------------
def run_worker(job: dict[str, Any], workdir: Path, threads: int) -> dict[str, Any]:
    """Run one side in a fresh process; its result, or :class:`BenchError` with the end of its stderr."""
    name = f"{job['kind']}-{job.get('side', '')}-{time.monotonic_ns()}"
    job_path, result = workdir / f"{name}.job.json", workdir / f"{name}.result.json"
    job = {**job, "result": str(result)}
    job_path.write_text(json.dumps(job))
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    # The worker imports what this process imported, even when that came from sys.path rather than an install.
    import glm_export
    import glm_runtime

    roots = [str(Path(m.__file__).resolve().parents[1]) for m in (glm_export, glm_runtime)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "glm_export.bench.worker", str(job_path)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode or not result.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        what = f"the {job['kind']} side" + (f" ({job['path']})" if job.get("path") else "")
        raise BenchError(f"{what} failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(result.read_text())


def run(settings: Settings) -> dict[str, Any]:
    """Measure every side for ``settings.repeats`` rounds; return the whole report (see :func:`summarize`)."""
    from glm_export.progress import console, count_progress

    sides, info = plan(settings)
    cfg = info["config"]
    cases = [(b, p) for b in settings.batches for p in settings.prompt_lens]
    results: dict[str, Any] = {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": settings.command, "machine": machine_info(), "versions": versions(),
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()
                        if k not in ("artifacts", "command")},
                     "artifacts": [str(a) for a in settings.artifacts]},
        "sides": [asdict(s) for s in sides],
        "cases": [{"key": case_key(b, p), "batch": b, "prompt_len": p} for b, p in cases],
        "kv_bytes_per_token": {s.id: cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * s.kv_itemsize
                               for s in sides},
        "rounds": [], "checks": {}, "tokens": {},
    }
    base = {"threads": settings.threads, "cases": cases, "new_tokens": settings.new_tokens,
            "warmup": settings.warmup, "seed": settings.seed, "vocab_size": cfg.vocab_size,
            "check_tokens": settings.check_tokens}
    wrong: set[str] = set()
    total = settings.repeats * (len(sides) + 1) + (len(sides) - 1 if settings.profile else 0)
    with tempfile.TemporaryDirectory(prefix="glm-bench-") as tmp, count_progress() as progress:
        task = progress.add_task("bench", total=total)
        for r in range(settings.repeats):
            # Round 1: PyTorch first (its tokens are the reference the runtime sides are checked against before
            # they are timed); later rounds rotate the order so no side always runs first or last.
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            rnd: dict[str, Any] = {"index": r, "order": [s.id for s in order], "sides": {},
                                   "loadavg_start": os.getloadavg()[0]}
            progress.update(task, description=f"round {r + 1}/{settings.repeats}: bandwidth")
            rnd["bandwidth"] = run_worker({"kind": "bandwidth", "threads": settings.threads,
                                           "probe_gib": settings.probe_gib}, Path(tmp), settings.threads)["bandwidth"]
            progress.advance(task)
            for side in order:
                progress.update(task, description=f"round {r + 1}/{settings.repeats}: {side.label}")
                if side.id in wrong:
                    progress.advance(task)
                    continue
                job = {**base, "kind": side.kind, "side": side.id, "path": side.path}
                if side.kind == "torch":
                    job.update(model=side.path, torch_dtype=settings.torch_dtype, compile=settings.compile,
                               attn=settings.attn)
                else:
                    job.update(artifact=side.path, strict=side.strict)
                    if r == 0:
                        job["reference"] = results["tokens"][TORCH]
                out = run_worker(job, Path(tmp), settings.threads)
                for key, case in out["cases"].items():
                    tokens = case.pop("tokens", None)
                    if r == 0 and tokens is not None:
                        results["tokens"].setdefault(side.id, {})[key] = tokens
                    if "check" in case:
                        results["checks"].setdefault(side.id, {})[key] = check_status(case["check"], side.strict)
                        if case["check"].get("skipped_timing"):
                            wrong.add(side.id)
                rnd["sides"][side.id] = out
                progress.advance(task)
            rnd["loadavg_end"] = os.getloadavg()[0]
            results["rounds"].append(rnd)
            if r == 0 and wrong:
                labels = ", ".join(s.label for s in sides if s.id in wrong)
                console.print(f"[bold red]{labels}: greedy tokens differ from PyTorch's: not timed, no speed-up "
                              f"reported[/]")
        if settings.profile:
            results["profile"] = {}
            for side in sides[1:]:
                progress.update(task, description=f"profiling {side.label}")
                if side.id not in wrong:
                    results["profile"][side.id] = run_worker(
                        {**base, "kind": "profile", "side": side.id, "path": side.path, "artifact": side.path},
                        Path(tmp), settings.threads)
                progress.advance(task)
    results.update(summarize(results))
    return results


def check_status(check: dict[str, Any], strict: bool) -> dict[str, Any]:
    n, k = check["compared"], check["matched"]
    status = "identical" if k == n else ("WRONG" if strict else "diverges")
    return {**check, "strict": strict, "status": status}


# ---- summary ---------------------------------------------------------------------------------------------
def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": list(values)}


def samples(results: dict[str, Any], side: str, key: str, metric: str) -> list[float | None]:
    """One value per round (``None`` where the side did not run or has no such metric)."""
    out: list[float | None] = []
    for rnd in results["rounds"]:
        s = rnd["sides"].get(side, {}).get("cases", {}).get(key, {}).get("sample")
        out.append(None if s is None else s.get(metric))
    return out


def advantage(metric: Metric, torch_value: float, runtime_value: float) -> float:
    """How many times better the runtime is (> 1: better): time and memory torch/runtime, rates runtime/torch."""
    if metric.higher_is_better:
        return runtime_value / torch_value
    return torch_value / runtime_value


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians and spread per side, case and metric; per-round ratios against PyTorch; the roofline."""
    from glm_export.bench.roofline import decode_bound, kv_bytes_per_step
    from glm_runtime.engine import round_cache_len

    new_tokens = results["settings"]["new_tokens"]
    bandwidth = [rnd["bandwidth"]["read_gb_s"] for rnd in results["rounds"]]
    summary: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    roof: dict[str, Any] = {"read_gb_s": _spread(bandwidth), "sides": {}}
    wrong = wrong_sides(results)
    for side in results["sides"]:
        sid = side["id"]
        for case in results["cases"]:
            key, batch, prompt_len = case["key"], case["batch"], case["prompt_len"]
            for m in METRICS:
                vals = samples(results, sid, key, m.key)
                if all(v is not None for v in vals) and vals:
                    summary.setdefault(sid, {}).setdefault(key, {})[m.key] = _spread(vals)  # type: ignore[arg-type]
                if sid == TORCH or sid in wrong:  # a wrong runtime gets no speed-up, in any case
                    continue
                base = samples(results, TORCH, key, m.key)
                pairs = [advantage(m, t, v) for t, v in zip(base, vals, strict=True)
                         if t is not None and v is not None and t > 0 and v > 0]
                if pairs:
                    ratios.setdefault(sid, {}).setdefault(key, {})[m.key] = {
                        "median": statistics.median(pairs), "per_round": pairs}
            # Roofline: the bytes one decode step reads, and the steps/s that bandwidth allows.
            if side["kind"] == "runtime":
                cache_len = round_cache_len(prompt_len + new_tokens, 1 << 62)  # as the runtime sizes it
            else:
                cache_len = prompt_len + new_tokens // 2  # PyTorch's cache grows: its mean length
            per_step = side["bytes_per_step_weights"] + kv_bytes_per_step(
                results["kv_bytes_per_token"][sid], batch, cache_len)
            steps = [None if v is None else v / batch for v in samples(results, sid, key, "decode_tok_s")]
            fractions = [s / decode_bound(bw, per_step) for s, bw in zip(steps, bandwidth, strict=True)
                         if s is not None]
            roof["sides"].setdefault(sid, {})[key] = {
                "bytes_per_step": per_step,
                "bound_tok_s": decode_bound(statistics.median(bandwidth), per_step) * batch,
                "fraction": statistics.median(fractions) if fractions else None,
                "fraction_per_round": fractions}
    return {"summary": summary, "ratios": ratios, "roofline": roof}


# ---- machine and versions --------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx", "fma", "avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
    except OSError:
        pass
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cpu_flags": flags, "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "ram_bytes": ram, "gpu": gpu, "os": platform.platform(), "hostname": platform.node()}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("glm-export", "glm-runtime", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx",
                 "numpy", "tensorrt", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---- report ----------------------------------------------------------------------------------------------
def _fmt(metric: Metric, value: float) -> str:
    return f"{value * metric.scale:.{metric.digits}f}"


def table_rows(results: dict[str, Any], key: str) -> tuple[list[str], list[list[str]]]:
    """The table of one case: a column per side, the runtime sides each followed by their ratio to PyTorch."""
    sides = results["sides"]
    header = ["metric"]
    for s in sides:
        header.append(s["label"])
        if s["kind"] == "runtime":
            header.append("vs PyTorch")
    rows = []
    for m in METRICS:
        cells = [f"{m.label} ({m.unit})"]
        present = False
        for s in sides:
            stat = results["summary"].get(s["id"], {}).get(key, {}).get(m.key)
            if stat is None:
                cells.append("—")
            else:
                present = True
                spread = f" [{_fmt(m, stat['min'])}–{_fmt(m, stat['max'])}]" if len(stat["samples"]) > 1 else ""
                cells.append(_fmt(m, stat["median"]) + spread)
            if s["kind"] == "runtime":
                ratio = results["ratios"].get(s["id"], {}).get(key, {}).get(m.key)
                cells.append("—" if ratio is None else f"{ratio['median']:.2f}x")
        if present:
            rows.append(cells)
    read = ["bytes read per decode step (GB)"]
    bound, frac = ["decode bound at measured bandwidth (tok/s)"], ["fraction of the bound reached"]
    for s in sides:
        r = results["roofline"]["sides"][s["id"]][key]
        read.append(f"{r['bytes_per_step'] / 1e9:.3f}")
        bound.append(f"{r['bound_tok_s']:.2f}")
        frac.append("—" if r["fraction"] is None else f"{r['fraction']:.0%}")
        if s["kind"] == "runtime":
            read.append("")
            bound.append("")
            frac.append("")
    overhead = ["decode time outside the engine's run call (Python)"]
    for s in sides:
        vals = [v for v in samples(results, s["id"], key, "overhead_fraction") if v is not None]
        overhead.append(f"{statistics.median(vals):.1%}" if vals else "—")
        if s["kind"] == "runtime":
            overhead.append("")
    compared = min(results["settings"]["check_tokens"], results["settings"]["new_tokens"])
    check = [f"greedy tokens = PyTorch's (first {compared})", "reference"]
    for s in sides[1:]:
        c = results["checks"].get(s["id"], {}).get(key)
        if c is None:
            check += ["not checked", ""]
        elif c["status"] == "identical":
            check += [f"{c['matched']}/{c['compared']} identical", ""]
        elif c["status"] == "WRONG":
            check += [f"WRONG: {c['matched']}/{c['compared']}", "not timed"]
        else:
            check += [f"{c['matched']}/{c['compared']} (quantized: diverges)", ""]
    return header, [*rows, read, bound, frac, overhead, check]


def headline(results: dict[str, Any]) -> str:
    st, m = results["settings"], results["machine"]
    bw = results["roofline"]["read_gb_s"]
    return (f"{m['cpu']}, {st['threads']} threads{', GPU ' + m['gpu'] if m['gpu'] else ''}; "
            f"{st['new_tokens']} new tokens, greedy; {len(results['rounds'])} rounds x "
            f"(warm-up {st['warmup']} + 1 timed run) per side, alternating; median [min–max]; "
            f"ratios: median of per-round ratios, >1 = runtime better. Read bandwidth "
            f"{bw['median']:.1f} GB/s (median of rounds; best probe per round)")


def markdown(results: dict[str, Any]) -> str:
    lines = ["# glm-export bench", "", f"`{results['command']}`" if results["command"] else "", "",
             headline(results) + ".", ""]
    if results["settings"].get("torch_dtype_note"):
        lines += [f"**{results['settings']['torch_dtype_note']}.**", ""]
    for case in results["cases"]:
        lines.append(f"## batch {case['batch']}, prompt {case['prompt_len']} tokens")
        lines.append("")
        header, rows = table_rows(results, case["key"])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    lines += [_engines(results), "", _wrong_note(results)]
    if results.get("profile"):
        from glm_export.bench import profiling as bench_profile

        lines += ["", "## Where a decode step spends its time", ""]
        labels = {s["id"]: s["label"] for s in results["sides"]}
        for sid, prof in results["profile"].items():
            lines += bench_profile.markdown(prof, labels[sid])
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"


def _engines(results: dict[str, Any]) -> str:
    first = results["rounds"][0]["sides"] if results["rounds"] else {}
    parts = [f"{s['label']}: {first[s['id']]['engine']}" for s in results["sides"] if s["id"] in first]
    return "Engines: " + "; ".join(parts) + "."


def _wrong_note(results: dict[str, Any]) -> str:
    bad = wrong_sides(results)
    wrong = [s["label"] for s in results["sides"] if s["id"] in bad]
    if not wrong:
        return ""
    return (f"**{', '.join(wrong)}: greedy tokens differ from PyTorch's on the same weights: the output is wrong, "
            f"so it was not timed and no speed-up is reported.**")


def print_tables(results: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from glm_export.progress import console

    console.print(escape(headline(results)), highlight=False)
    if results["settings"].get("torch_dtype_note"):
        console.print(f"[bold]{escape(results['settings']['torch_dtype_note'])}[/]", highlight=False)
    for case in results["cases"]:
        header, rows = table_rows(results, case["key"])
        table = Table(title=f"batch {case['batch']}, prompt {case['prompt_len']} tokens", title_justify="left")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*(escape(c) for c in r))
        console.print(table)
    note = _wrong_note(results)
    if note:
        console.print(f"[bold red]{escape(note.strip('*'))}[/]", highlight=False)
    labels = {s["id"]: s["label"] for s in results["sides"]}
    for sid, prof in (results.get("profile") or {}).items():
        s = prof["step_us"]
        console.print(f"{labels[sid]} decode step {s['wall'] / 1e3:.3f} ms (profiler on): Python "
                      f"{s['python'] / s['wall']:.1%}, ORT framework {s['ort_framework'] / s['wall']:.1%}, kernels "
                      f"{s['kernels'] / s['wall']:.1%} (" + ", ".join(
                          f"{op} {us / s['kernels']:.0%}" for op, us in list(prof["ops_us"].items())[:4]) + ")",
                      highlight=False)


def chart_png(results: dict[str, Any]) -> bytes:
    """Bars per case: PyTorch and each runtime precision; whiskers min-max; labels: the runtime's advantage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [m for m in METRICS if m.key in ("ttft_s", "tpot_s", "decode_tok_s", "prefill_tok_s", "e2e_s",
                                               "peak_rss_bytes")]
    sides, cases = results["sides"], results["cases"]
    colors = ["#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    fig, axes = plt.subplots(2, 3, figsize=(max(12.0, 1.1 * len(cases) * len(sides) + 4), 8.5))
    width = 0.8 / len(sides)
    handles: dict[str, Any] = {}
    for ax, m in zip(axes.flat, panels, strict=True):
        for j, s in enumerate(sides):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                stat = results["summary"].get(s["id"], {}).get(case["key"], {}).get(m.key)
                if stat is None:
                    continue
                xs.append(i + (j - (len(sides) - 1) / 2) * width)
                ys.append(stat["median"] * m.scale)
                lo.append((stat["median"] - stat["min"]) * m.scale)
                hi.append((stat["max"] - stat["median"]) * m.scale)
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[j % len(colors)],
                          label=s["label"], edgecolor="black", linewidth=0.5)
            handles[s["label"]] = bars
            if s["kind"] == "runtime":
                for bar, case in zip(bars, [c for c in cases if
                                            results["summary"].get(s["id"], {}).get(c["key"], {}).get(m.key)],
                                     strict=True):
                    ratio = results["ratios"].get(s["id"], {}).get(case["key"], {}).get(m.key)
                    if ratio is not None:
                        top = results["summary"][s["id"]][case["key"]][m.key]["max"] * m.scale  # above the whisker
                        ax.annotate(f"{ratio['median']:.2f}x", (bar.get_x() + bar.get_width() / 2, top),
                                    ha="center", va="bottom", fontsize=7, fontweight="bold", xytext=(0, 2),
                                    textcoords="offset points", rotation=90 if len(bars) * len(sides) > 6 else 0)
            if m.key == "decode_tok_s":  # the bandwidth bound of this side, a dash over its bar
                for x, case in zip(xs, cases, strict=False):
                    bound = results["roofline"]["sides"][s["id"]][case["key"]]["bound_tok_s"]
                    ax.hlines(bound, x - width / 2, x + width / 2, colors="black", linestyles="dashed", linewidth=1)
        better = "higher is better" if m.higher_is_better else "lower is better"
        ax.set_title(f"{m.label} ({m.unit}), {better}", fontsize=10)
        ax.set_xticks(range(len(cases)), [f"batch {c['batch']}\nprompt {c['prompt_len']}" for c in cases],
                      fontsize=8)
        ax.margins(y=0.15)
    wrong = wrong_sides(results)
    labels = [s["label"] + (" (WRONG tokens: not timed)" if s["id"] in wrong else "") for s in sides]
    fig.legend([handles.get(s["label"], Patch(color=colors[j % len(colors)])) for j, s in enumerate(sides)], labels,
               loc="lower center", ncol=len(sides), fontsize=9)
    st, mach = results["settings"], results["machine"]
    fig.suptitle(f"glm-runtime vs PyTorch (transformers), {mach['cpu']}, {st['threads']} threads, "
                 f"{st['new_tokens']} new tokens\nmedian of {len(results['rounds'])} alternating rounds, whiskers "
                 f"min–max, labels = runtime advantage (>1 better), dashes = bandwidth bound", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in ``out``, each atomically; the paths written."""
    from glm_export.atomic import write_bytes, write_text
    from glm_export.progress import console

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "bench.json", json.dumps(results, indent=1) + "\n")
    write_text(out / "bench.md", markdown(results))
    written = [out / "bench.json", out / "bench.md"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("bench.png skipped: matplotlib is not installed (pip install 'glm-export[plot]')")
        return written
    write_bytes(out / "bench.png", chart_png(results))
    return [*written, out / "bench.png"]


def wrong_sides(results: dict[str, Any]) -> set[str]:
    """Sides whose greedy tokens had to match PyTorch's and did not (in any case)."""
    return {sid for sid, checks in results["checks"].items() if any(c["status"] == "WRONG" for c in checks.values())}


def any_wrong(results: dict[str, Any]) -> bool:
    return bool(wrong_sides(results))


def run_and_report(settings: Settings) -> bool:
    """Measure, print the tables, write the outputs; False when a runtime side gave wrong tokens."""
    from glm_export.progress import console

    results = run(settings)
    print_tables(results)
    for path in write_report(results, settings.out):
        console.print(f"wrote {path}", highlight=False)
    return not any_wrong(results)


def command_line(argv: Sequence[str]) -> str:
    return "glm-export " + " ".join(shlex.quote(a) for a in argv)
