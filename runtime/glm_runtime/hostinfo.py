"""What machine this is, as a bug report needs it (``glm-runtime env`` / ``glm-export env``) and as the int8
kernels care about it (VNNI or not).

Modelled on ``vllm collect-env``: package versions, Python, the CPU and the instruction-set extensions ONNX
Runtime's kernels choose between, execution providers, TensorRT flavours, GPU and compute capability, free RAM and
disk. Everything is read without importing heavy packages (versions come from package metadata), and every probe
that can fail says "unknown" instead of raising: the command must work on a broken install, which is when it is
needed most.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# The extensions ONNX Runtime's MLAS kernels dispatch on (x86: SSE4.1 / AVX / AVX2 / AVX-512 / VNNI / AMX; Arm:
# NEON dot product, i8mm, bf16). int8 matters most: without a VNNI-class dot product, MLAS multiplies u8 x s8 pairs
# with vpmaddubsw, which adds them in int16 and saturates unless weights use 7 bits (quantize.py).
ISA_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16",
             "sve")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
PACKAGES = ("glm-export", "glm-runtime", "onnxruntime", "onnxruntime-gpu", "onnx", "onnx-ir", "onnxscript", "torch",
            "transformers", "numpy", "tokenizers", "safetensors", "jinja2", "tensorrt", "tensorrt-rtx-cu13-bindings",
            "tensorrt-rtx-cu13-libs", "cuda-python", "fastapi", "uvicorn", "pydantic", "ray", "tiktoken")
ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES", "GLM_EXPORT_CACHE",
            "ORT_DISABLE_ALL", "PYTHONPATH", "GLM_RUNTIME_INT4_KERNEL", "GLM_RUNTIME_ATTENTION_KERNEL", "GLM_Q4_ISA")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux), else {}."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def cpu() -> dict[str, Any]:
    """CPU model, logical cores, and which of the ISA extensions that matter to ONNX Runtime it has."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("features") or "").split())
    model = info.get("model name") or info.get("cpu model") or platform.processor() or "unknown"
    return {
        "model": model,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags] if flags else ["unknown"],
        "int8_dot_product": bool(flags & set(INT8_DOT_FLAGS)) if flags else None,
    }


def int8_dot_product() -> bool | None:
    """Whether this CPU has an int8 dot-product instruction ONNX Runtime uses (VNNI, AMX, Arm dotprod / i8mm):
    then full-range int8 weights cannot saturate. None when it cannot be told."""
    return cpu()["int8_dot_product"]


def packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def onnxruntime_info() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as e:  # a broken install is what this command is for
        return {"error": f"{type(e).__name__}: {e}"}
    return {"version": ort.__version__, "device": ort.get_device(), "providers": ort.get_available_providers()}


def gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs via nvidia-smi (name, compute capability, memory, driver); [] without one."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return [{"error": f"nvidia-smi failed: {e}"}]
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        rows.append(dict(zip(("name", "compute_capability", "memory", "driver"), parts, strict=False)))
    return rows


def memory_and_disk(path: Path) -> dict[str, Any]:
    from glm_runtime.engine import available_memory_bytes

    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        disk = shutil.disk_usage(path)
        disk_free: int | None = disk.free
    except OSError:
        disk_free = None
    return {"ram_total_bytes": total, "ram_available_bytes": available_memory_bytes(), "disk_path": str(path),
            "disk_free_bytes": disk_free}


def collect(path: Path | None = None) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable,
        "cpu": cpu(), "packages": packages(), "onnxruntime": onnxruntime_info(), "int4_kernel": int4_kernel_info(),
        "gpus": gpus(),
        "memory": memory_and_disk(path or Path.cwd()),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def int4_kernel_info() -> dict[str, Any]:
    """Whether the runtime's CPU kernels (glm_runtime.cpu_kernel: int4 MatMulNBits, Attention) are built, and the
    paths they take here."""
    from glm_runtime import cpu_kernel

    path = cpu_kernel.library_path()
    if path is None:
        return {"built": False}
    kernel = cpu_kernel.load(None)
    if kernel is None:
        return {"built": True, "path": str(path), "isa": "none (no AVX2: ONNX Runtime's)",
                "attention": "ONNX Runtime's (no AVX2)"}
    why_not = cpu_kernel.attention_unavailable(kernel)
    return {"built": True, "path": str(path), "isa": kernel.isa,
            "attention": f"ONNX Runtime's ({why_not})" if why_not else f"the runtime's ({cpu_kernel.attention_isa()})",
            "hugepages": transparent_hugepages()}


def transparent_hugepages() -> str:
    """The kernel's transparent huge page mode ("always [madvise] never": madvise), which decides whether the int4
    kernel's copies get 2 MB pages (docs/runtime.md, "Huge pages")."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown (no /sys/kernel/mm/transparent_hugepage)"
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
    return mode + ("" if mode in ("always", "madvise") else ": the int4 weights stay on 4 KB pages")


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def render(info: dict[str, Any]) -> str:
    """Plain text for a bug report (paste it as is)."""
    c, m, o = info["cpu"], info["memory"], info["onnxruntime"]
    lines = [
        f"Python: {info['python']} ({info['executable']})", f"Platform: {info['platform']}",
        f"CPU: {c['model']} ({c['machine']}), {c['usable_cores']} of {c['logical_cores']} logical cores usable",
        f"CPU ISA (as ONNX Runtime dispatches): {' '.join(c['isa'])}",
        f"int8 dot product (VNNI/AMX/dotprod): {'unknown' if c['int8_dot_product'] is None else c['int8_dot_product']}",
        f"ONNX Runtime: {o.get('version', o.get('error'))}; providers: {', '.join(o.get('providers', []))}",
        "int4 kernel: " + (f"built, {info['int4_kernel']['isa']}; attention: {info['int4_kernel']['attention']}; "
                           f"transparent huge pages: {info['int4_kernel'].get('hugepages', 'unknown')}"
                           if info["int4_kernel"]["built"]
                           else "not built (no C compiler at install): ONNX Runtime's MatMulNBits and Attention"),
        "GPU: " + ("; ".join(f"{g.get('name')} (compute capability {g.get('compute_capability')}, "
                             f"{g.get('memory')}, driver {g.get('driver')})" if "error" not in g else g["error"]
                             for g in info["gpus"]) or "none (no nvidia-smi)"),
        f"RAM: {_gib(m['ram_available_bytes'])} available of {_gib(m['ram_total_bytes'])}",
        f"Disk free at {m['disk_path']}: {_gib(m['disk_free_bytes'])}",
        "Packages:", *[f"  {k}=={v}" for k, v in info["packages"].items()],
    ]
    trt = [k for k in info["packages"] if k.startswith("tensorrt")]
    pkgs = info["packages"]
    lines.insert(8, "TensorRT: " + (", ".join(f"{k} {pkgs[k]}" for k in trt) or "not installed"))
    if info["env"]:
        lines += ["Environment:", *[f"  {k}={v}" for k, v in info["env"].items()]]
    return "\n".join(lines)
