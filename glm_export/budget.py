"""What a build will need, estimated from the config before any work, and a refusal with numbers when it will not
fit: a 9B build that the kernel kills after 15 minutes of work (and 36 GB of stages) helps nobody.

The estimates are deliberately simple sums of the big buffers each step holds at its peak, in bytes, from the
model's shapes and the options (see ``docs/memory.md`` for the derivation and the measured numbers they are
checked against). They are upper-leaning: ``--skip-memory-check`` builds anyway.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_runtime.config import ModelConfig

GiB = 1024**3
BASE = int(0.8 * GiB)  # Python, torch, ONNX Runtime and onnx_ir loaded, the traced graph's structure
ROWS_KEPT = 512  # calibrate.ROWS_KEPT rows, twice before a trim
CHUNK_BYTES = 64 << 20  # quantize.rewrite.CHUNK_BYTES (not imported: this module stays light)
# ONNX Runtime's session of an artifact: its initializers plus prepacking slack. Measured at the accuracy step of
# streamed GLM-4-9B builds (peak RSS minus BASE and the logits, over the artifact): int8 1.0 (11.89 GB peak, 10.0 GB
# artifact); int4 1.12 (8,594,524 KiB peak, 6.2 GB artifact: MatMulNBits pre-packs its weights with per-block sums).
ORT_SESSION_FACTOR = {"int4": 1.15}
ORT_SESSION_DEFAULT = 1.1


def session_bytes(art: int, precision: str) -> int:
    return int(ORT_SESSION_FACTOR.get(precision, ORT_SESSION_DEFAULT) * art)


@dataclass
class Estimate:
    """Peak memory and disk of one build, with the step that sets the peak and what each step holds."""

    peak: int
    peak_step: str
    disk: int
    artifact: int
    steps: dict[str, int] = field(default_factory=dict)
    streamed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak, "peak_step": self.peak_step, "disk_bytes": self.disk,
                "artifact_bytes": self.artifact, "steps": self.steps, "streamed": self.streamed}


def layer_params(cfg: ModelConfig) -> int:
    return (cfg.hidden_size * cfg.qkv_size + cfg.q_size * cfg.hidden_size
            + 3 * cfg.hidden_size * cfg.ffn_hidden_size)


def artifact_bytes_per_weight(precision: str, weight_block: int = 32) -> float:
    return {"int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / weight_block, "fp32": 4.0, "fp16": 2.0, "bf16": 2.0}[precision]


def head_bytes_per_weight(precision: str, weight_block: int = 32, lm_head: str = "same") -> float:
    """The output layer's bytes per weight: ``lm_head`` as the build resolved it (``int8``, ``float`` = 16-bit,
    ``same`` = the artifact's precision; ``quantize.rewrite.resolve_lm_head``: GLM-4-9B int4 and fp8 are int8)."""
    if precision not in ("int8", "fp8", "int4"):
        return artifact_bytes_per_weight(precision, weight_block)
    return {"int8": 1.0, "float": 2.0}.get(lm_head, artifact_bytes_per_weight(precision, weight_block))


def artifact_bytes(cfg: ModelConfig, precision: str, weight_block: int = 32, embed_bytes: int = 2,
                   lm_head: str = "same") -> int:
    """The artifact's weights: quantized MatMuls (decoder layers and lm_head), the embedding, small tensors."""
    per_weight = artifact_bytes_per_weight(precision, weight_block)
    head = cfg.vocab_size * cfg.hidden_size * head_bytes_per_weight(precision, weight_block, lm_head)
    embed = cfg.vocab_size * cfg.hidden_size * (embed_bytes if precision in ("int8", "fp8", "int4") else
                                                per_weight)
    return int(cfg.num_layers * layer_params(cfg) * per_weight + head + embed
               + 8 * cfg.num_layers * cfg.hidden_size * 4)


def tensorrt_form_on_cpu(cfg: ModelConfig) -> int:
    """What ONNX Runtime CPU adds to a run of a TensorRT-form graph (the accuracy report's only way to run it without
    a GPU): it has no fp16 MatMul, so each weight goes DequantizeLinear -> fp16 -> Cast -> float32 -> MatMul, and
    it schedules the weight-only DequantizeLinear nodes ahead of their MatMuls, so many dequantized weights are
    alive at once. Measured: glm-4-9b-2layer int8 7.26 GB peak RSS (2.3 GB artifact); GLM-4-9B int8 passed 16 GB
    of anonymous memory within its first run (OOM-killed at 24 GB). Counted here as every MatMul weight in fp16
    and float32 at once: 6 bytes per weight (53 GB for GLM-4-9B)."""
    return 6 * (cfg.num_layers * layer_params(cfg) + cfg.vocab_size * cfg.hidden_size)


def calibration_bytes(cfg: ModelConfig, samples: int, seq_len: int, layers_kept: int | None = None) -> int:
    """Hidden states of every sequence (float32) plus one layer's activations and the kept input rows: of every
    layer (``layers_kept`` None), or of that many (the streamed path drops a layer's rows once it is quantized)."""
    hidden = samples * seq_len * cfg.hidden_size * 4
    activations = seq_len * (cfg.qkv_size + 3 * cfg.ffn_hidden_size + 4 * cfg.hidden_size) * 4 \
        + cfg.num_heads * seq_len * seq_len * 4
    layers = cfg.num_layers if layers_kept is None else layers_kept
    rows = ROWS_KEPT * 4 * (layers * (3 * cfg.hidden_size + cfg.ffn_hidden_size) + cfg.hidden_size)
    return hidden + activations + rows


def gptq_bytes(cfg: ModelConfig) -> int:
    """What GPTQ adds while it quantizes one decoder layer (``quantize.gptq``): the layer's ``X^T X`` (float32,
    ``in x in`` per MatMul; the streamed path hands these buffers to GPTQ, which permutes them in place), and for
    the widest input (GLM-4-9B's down projection, 13696: 750 MB a matrix) up to three more matrices of that size
    inside ``hinv_factor`` (the flipped copy, the Cholesky factor, the inverse being built). Measured on
    glm-4-9b-2layer (GLM-4-9B's layers), int4 defaults, ``--stream``, 16 x 128 calibration: peak RSS 4.35 GiB; 6.63
    GiB when GPTQ copied the sums twice and permuted into a new matrix (docs/memory.md)."""
    k = cfg.ffn_hidden_size
    layer = 4 * (3 * cfg.hidden_size ** 2 + k * k)
    return layer + 3 * 4 * k * k


# A weightless engine's build holds the graph's structure and the builder's own state, not the weights: measured
# 0.71 GB peak RSS for GLM-4-9B fp16 (two profiles, TensorRT-RTX 1.7), a 40 MB plan (docs/memory.md).
WEIGHTLESS_ENGINE = int(0.5 * GiB)
WEIGHTLESS_PLAN = 128 << 20


def engine_step(weight_bytes: int, quantized: bool, weights: str) -> tuple[int, int]:
    """Peak RSS and plan size on disk of an engine build over ``weight_bytes`` of graph weights.

    Embedded weights, measured with TensorRT-RTX 1.7 (weights handed over as mapped memory, the plan streamed to
    disk; docs/memory.md): peak RSS 3.9x the fp16 weights, 3.4x the int8 graph's; the plan holds the weights once
    per optimization profile (decode + prefill): 1.65x / 1.5x on disk. Weights as inputs: neither grows with them.
    """
    if weights == "inputs":
        return BASE + WEIGHTLESS_ENGINE, WEIGHTLESS_PLAN
    return BASE + int(weight_bytes * (3.4 if quantized else 3.9)), int(weight_bytes * (1.5 if quantized else 1.65))


def estimate(cfg: ModelConfig, precision: str, backend: str, streamed: bool, calib_samples: int = 256,
             calib_seq_len: int = 512, accuracy_samples: int = 8, weight_block: int = 32,
             engine_weights: str = "embedded", lm_head: str = "same", gptq: bool = False) -> Estimate:
    """Peak RSS and disk of ``glm-export build`` for this model, precision, backend and path. ``lm_head``: the
    output layer's form as the build resolved it; ``gptq``: int4 weights by GPTQ (its second moments)."""
    quantized = precision in ("int8", "fp8", "int4")
    p = cfg.num_parameters()
    art = artifact_bytes(cfg, precision, weight_block, lm_head=lm_head)
    gptq_unit = gptq_bytes(cfg) if gptq and precision == "int4" else 0
    steps: dict[str, int] = {}
    layer32 = 4 * layer_params(cfg)
    # accuracy.measure: float32 reference logits of every 128-token sequence, then per sequence the graph's logits
    # and two float64 log-softmaxes
    acc_logits = (accuracy_samples * 4 + 4 + 2 * 8) * 128 * cfg.vocab_size if accuracy_samples else 0
    if accuracy_samples and backend != "onnxruntime":
        acc_logits += tensorrt_form_on_cpu(cfg)
    if quantized and streamed:
        # Each layer is quantized as soon as calibration has run it (calibrate.collect_streamed's layer_done), so
        # the two steps' buffers add up: the hidden states, one layer in float32 for the forward pass and again
        # for the rewrite, its largest tensor twice while copied, its quantized form, one layer's kept rows and
        # GPTQ's matrices.
        rows = calibration_bytes(cfg, calib_samples, calib_seq_len, layers_kept=1)
        steps["calibrate"] = BASE + layer32 + rows
        biggest = 4 * 2 * cfg.hidden_size * cfg.ffn_hidden_size
        layer_unit = BASE + 2 * layer32 + biggest + layer_params(cfg) + rows + gptq_unit
        # ... or the output layer, quantized in chunks of columns (quantize.rewrite.quantize_wide): its 16-bit
        # checkpoint rows mapped, its quantized form, a few float32 chunks, the rows kept (GLM-4-9B int8: 7.8 GB
        # measured before chunking; 2.41 GB for the output layer alone after, plus the rows)
        head_unit = (BASE + cfg.vocab_size * cfg.hidden_size * 2 + artifact_bytes_per_weight(precision,
                     weight_block) * cfg.vocab_size * cfg.hidden_size + 6 * CHUNK_BYTES
                     + calibration_bytes(cfg, calib_samples, calib_seq_len, layers_kept=0))
        steps["quantize"] = int(max(layer_unit, head_unit))
        if accuracy_samples:
            steps["accuracy"] = BASE + session_bytes(art, precision) + acc_logits
        disk = art
    elif quantized:
        export_dtype = 4 if backend == "onnxruntime" else 2
        steps["export"] = BASE + 4 * cfg.vocab_size * cfg.hidden_size
        # The float32 model and the 16-bit checkpoint it was read from (mapped, resident), the calibration, and the
        # accuracy reference's logits, computed while the model is loaded (quantize.rewrite.quantize_into). Then
        # the rewrite: the float32 graph, one vocabulary-sized tensor copied as float32, the artifact, the kept rows.
        # Measured, glm-4-9b-2layer int4 with the defaults (256 x 512 calibration, 8 accuracy sequences): 13.6 GiB
        # peak RSS (/usr/bin/time: 14,245,572 KiB; ~12 GiB sampled through calibration and the rewrite); 17.7 GiB when
        # the accuracy step loaded the model again. The calibration logits' factor 3 is fitted to that measurement.
        ref = (accuracy_samples * 4 * 128 * cfg.vocab_size) if accuracy_samples else 0
        logits = 3 * 4 * calib_seq_len * cfg.vocab_size  # one calibration sequence's logits, and copies
        steps["calibrate"] = BASE + 6 * p + calibration_bytes(cfg, calib_samples, calib_seq_len) + logits + ref
        steps["quantize"] = (BASE + 4 * p + 4 * cfg.vocab_size * cfg.hidden_size + art
                             + calibration_bytes(cfg, calib_samples, 0) + ref)
        if accuracy_samples:
            steps["accuracy"] = BASE + session_bytes(art, precision) + acc_logits
        disk = export_dtype * p + art
    else:
        size = {"fp32": 4, "fp16": 2, "bf16": 2}[precision]
        steps["export"] = BASE + size * cfg.vocab_size * cfg.hidden_size
        if precision == "fp32":
            steps["validate"] = BASE + 2 * 4 * p
        disk = art
    if backend != "onnxruntime":
        steps["engine"], plan = engine_step(art, quantized, engine_weights)
        disk += plan
    peak_step = max(steps, key=steps.__getitem__)
    return Estimate(steps[peak_step], peak_step, disk, art, steps, streamed)


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def check(est: Estimate, available: int, free_disk: int, cfg: ModelConfig, precision: str, backend: str,
          engine_weights: str = "embedded") -> None:
    """Raise :class:`BudgetError` naming the numbers and what to do when ``est`` does not fit."""
    problems = []
    if est.peak > available:
        steps = ", ".join(f"{k} {gib(v)}" for k, v in est.steps.items())
        todo = ["--calib-samples 16 --calib-seq-len 128 (calibration holds every sample's hidden states)"]
        if not est.streamed and precision in ("int8", "fp8", "int4"):
            todo.insert(0, "--stream (layer by layer: never the float32 model in memory)")
        if precision != "int4":
            todo.append("--precision int4 (the smallest artifact)")
        if backend != "onnxruntime" and engine_weights != "inputs":
            todo.append("--engine-weights inputs (a weightless engine: the runtime binds the weights)")
        if backend != "onnxruntime":
            todo.append("--backend onnxruntime (no engine builder holding the whole network), then "
                        "`glm-export engine` on a host with more RAM")
        todo.append("--accuracy-samples 0 (no accuracy report: its ONNX Runtime session holds the artifact)")
        todo.append(f"a machine with {gib(est.peak)} or more free RAM")
        problems.append(f"this build needs about {gib(est.peak)} of RAM at its peak ({est.peak_step}; {steps}), "
                        f"{gib(available)} is available. Try: " + "; ".join(todo))
    if est.disk > free_disk:
        export = "" if est.streamed or precision not in ("int8", "fp8", "int4") else " plus the float export"
        problems.append(f"this build writes about {gib(est.disk)} (artifact {gib(est.artifact)}{export}), "
                        f"{gib(free_disk)} is free on the output's file system: free space or write elsewhere (-o)")
    if problems:
        raise BudgetError("\n".join(problems) + "\n(--skip-memory-check builds anyway: the estimate is "
                          "upper-leaning, see docs/memory.md)")


class BudgetError(RuntimeError):
    """A build that will not fit this machine; the message has the numbers and the options that help."""


def free_disk(out: Path) -> int:
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free
