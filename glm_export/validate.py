"""Does the exported graph compute what the PyTorch model computes? Measured, per artifact.

Drives the ONNX graph in ONNX Runtime and :class:`~glm_export.model.GLM4` eagerly over the same
batch of right-padded prompts, then a run of single-token decode steps, and reports the largest logit
difference and whether greedy decoding picks the same tokens. ``build`` runs it and records the numbers in
the artifact's report; the tests run it with tight thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from glm_export.model import GLM4


class OrtGraph:
    """The artifact's graph in an ONNX Runtime session, driven by plain ``run`` (the runtime's engine uses
    IO binding for an in-place cache; here simplicity matters more than speed)."""

    def __init__(self, artifact: Path, threads: int | None = None) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # TensorScatter warns about copying when not IO-bound
        # No memory arena: with one the process grows by the transient buffers of every run (measured on
        # glm-4-9b-2layer's TensorRT-form int8 graph, whose fp16 MatMuls ORT CPU runs as DequantizeLinear -> Cast
        # to float32 -> MatMul: RSS 6.7 GB after one 128-token run, 11.3 GB after two; without it 1.2 GB after
        # each, 5.5 GB peak inside a run). The accuracy report runs many.
        opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = threads
        path = str(Path(artifact) / "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}
        self.cache_dtype = np.dtype(types.get(self.session.get_inputs()[3].type, "float32"))

    def step(self, ids: np.ndarray, pos: np.ndarray, logits_index: np.ndarray,
             cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = dict(zip(self.inputs, [ids, pos, logits_index, *cache], strict=True))
        out = self.session.run(None, feeds)
        return out[0], out[1:]


@dataclass
class Comparison:
    """Reference (PyTorch, or ONNX Runtime for an engine) against a candidate (the graph, or the engine)."""

    prefill_max_abs: float = 0.0
    decode_max_abs: list[float] = field(default_factory=list)
    greedy_reference: list[list[int]] = field(default_factory=list)
    greedy_candidate: list[list[int]] = field(default_factory=list)
    reference_absmax: float = 0.0  # largest |reference logit|: the scale float32 rounding errors are relative to
    context: int = 0  # longest attention span compared (prompt + decode steps)

    @property
    def max_abs(self) -> float:
        return max([self.prefill_max_abs, *self.decode_max_abs])

    @property
    def greedy_match(self) -> bool:
        return self.greedy_reference == self.greedy_candidate

    def to_dict(self) -> dict[str, Any]:
        return {"prefill_max_abs": self.prefill_max_abs, "decode_max_abs": self.decode_max_abs,
                "max_abs": self.max_abs, "reference_absmax": self.reference_absmax,
                "greedy_match": self.greedy_match,
                "greedy_tokens": len(self.greedy_reference[0]) if self.greedy_reference else 0}


def pad_prompts(prompts: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad prompts; return ids, position ids (0..len-1 and onward for the padding) and last indices."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad, dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    pos = np.tile(np.arange(longest, dtype=np.int64), (len(prompts), 1))
    last = np.array([[len(p) - 1] for p in prompts], dtype=np.int64)
    return ids, pos, last


def compare(model: GLM4, graph: OrtGraph, prompts: list[list[int]], decode_steps: int,
            cache_len: int | None = None) -> Comparison:
    """Prefill ``prompts`` (right-padded batch), then greedy-decode ``decode_steps`` tokens on both sides.

    Each side decodes its own greedy tokens; when they disagree, the comparison of logits stops being
    like-for-like, so from the first disagreement both are fed the PyTorch token.
    """
    ids, pos, last = pad_prompts(prompts)
    lengths = last[:, 0] + 1
    cache_len = cache_len or int(ids.shape[1] + decode_steps)
    torch_cache = model.new_cache(len(prompts), cache_len)
    onnx_cache = [np.zeros(t.shape, graph.cache_dtype) for t in torch_cache]
    result = Comparison(greedy_reference=[[] for _ in prompts], greedy_candidate=[[] for _ in prompts],
                        context=int(ids.shape[1] + decode_steps))
    with torch.no_grad():
        for step in range(decode_steps + 1):
            ref = model(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(last), *torch_cache)[0].numpy()
            got, onnx_cache = graph.step(ids, pos, last, onnx_cache)
            diff = float(np.abs(ref.astype(np.float64) - got).max())
            result.reference_absmax = max(result.reference_absmax, float(np.abs(ref).max()))
            if step == 0:
                result.prefill_max_abs = diff
            else:
                result.decode_max_abs.append(diff)
            t_tok, o_tok = ref[:, -1].argmax(-1), got[:, -1].argmax(-1)
            for b in range(len(prompts)):
                result.greedy_reference[b].append(int(t_tok[b]))
                result.greedy_candidate[b].append(int(o_tok[b]))
            ids = t_tok.reshape(-1, 1).astype(np.int64)
            pos = (lengths + step).reshape(-1, 1).astype(np.int64)
            last = np.zeros((len(prompts), 1), dtype=np.int64)
    return result


def compare_engine(engine: Any, graph: OrtGraph, prompts: list[list[int]], decode_steps: int) -> Comparison:
    """A runtime engine (TensorRT) against ONNX Runtime running the *same* graph, one prompt at a time (an
    engine may be built for batch 1): prefill, then ``decode_steps`` greedy steps fed the reference's token.

    What differs is only the kernels (fused fp16 attention, FP8/INT8 GEMMs, the in-place cache update), so the
    greedy tokens should agree and the logits differ by the precision's rounding.
    """
    result = Comparison()
    for prompt in prompts:
        ids, pos, last = pad_prompts([prompt])
        cfg, needed = engine.config, len(prompt) + decode_steps
        cache = engine.allocate(1, getattr(engine, "max_context", needed))  # TensorRT: pinned to the build's
        ref_cache = [np.zeros((1, cfg.num_kv_heads, needed, cfg.head_dim), graph.cache_dtype)
                     for _ in range(2 * cfg.num_layers)]
        ref_tokens: list[int] = []
        got_tokens: list[int] = []
        for step in range(decode_steps + 1):
            got = np.array(engine.step(cache, ids, pos, last), np.float64)
            ref, ref_cache = graph.step(ids, pos, last, ref_cache)
            diff = float(np.abs(ref[:, -1].astype(np.float64) - got).max())
            result.reference_absmax = max(result.reference_absmax, float(np.abs(ref[:, -1]).max()))
            result.context = max(result.context, len(prompt) + step + 1)
            if step == 0:
                result.prefill_max_abs = max(result.prefill_max_abs, diff)
            elif len(result.decode_max_abs) < step:
                result.decode_max_abs.append(diff)
            else:
                result.decode_max_abs[step - 1] = max(result.decode_max_abs[step - 1], diff)
            ref_tokens.append(int(ref[0, -1].argmax()))
            got_tokens.append(int(got[0].argmax()))
            ids = np.array([[ref_tokens[-1]]], np.int64)
            pos = np.array([[len(prompt) + step]], np.int64)
            last = np.zeros((1, 1), np.int64)
        result.greedy_reference.append(ref_tokens)
        result.greedy_candidate.append(got_tokens)
    return result
