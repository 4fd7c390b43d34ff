"""Quantization of the exported graph with calibration: FP8, INT8 (SmoothQuant), INT4/INT8 weight-only.

Placeholder interface wired into ``build``; the implementation lands with issue 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUANTIZED_PRECISIONS = ("fp8", "int8", "int4")


@dataclass(frozen=True)
class QuantOptions:
    """Everything the CLI lets a user choose about quantization (defaults are the documented ones)."""

    calibration: str = "default"  # "default" (shipped set), or a path to .jsonl / .txt
    calib_samples: int = 256
    calib_seq_len: int = 512
    smoothquant_alpha: float = 0.5
    weight_block: int = 128  # int4 / int8 weight-only block size (128 or 32)
    weight_method: str = "awq"  # "rtn" or "awq"
    kv_cache: str = "model"  # "model" (graph dtype), "fp8" or "int8"


def check_options(precision: str, options: QuantOptions) -> None:
    """Refuse bad quantization input before any expensive work (called by ``build`` first)."""
    raise NotImplementedError(
        f"--precision {precision} is not implemented in this version of glm-export yet; "
        f"use --precision fp32 (runs on ONNX Runtime CPU), fp16 or bf16"
    )


def quantize_into(model_dir: Path, artifact: Path, precision: str, options: QuantOptions) -> dict[str, Any]:
    """Quantize ``artifact/model.onnx`` in place (a staging directory); return the report's section."""
    raise NotImplementedError(
        f"--precision {precision} is not implemented in this version of glm-export yet; "
        f"use --precision fp32 (runs on ONNX Runtime CPU), fp16 or bf16"
    )
