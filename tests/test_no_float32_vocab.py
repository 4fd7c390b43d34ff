"""Issue 13, point 4: a quantized artifact never carries a vocabulary-sized (151552 x hidden) tensor, the
embedding or the output layer, in float32, whatever the precision, ``--lm-head`` choice or path (streamed or
whole-model). The scan reads every initializer's type and shape from the graph (no data): a float32 (or float64)
tensor with a dimension of the vocabulary's size and at least vocab x hidden / 8 elements fails (per-channel and
per-block scales are allowed: 1/32 of the matrix at most). The tiny model has GLM-4-9B's vocabulary."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from glm_export.checkpoint import Checkpoint
from glm_export.quantize.rewrite import QuantOptions, quantize_into
from glm_export.quantize.stream import quantize_streamed
from glm_runtime.config import ModelConfig

FAST = {"calib_samples": 8, "calib_seq_len": 32, "accuracy_samples": 0}
WIDE_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


def float32_vocab_tensors(artifact: Path, cfg: ModelConfig) -> list[str]:
    graph = ir.load(artifact / "model.onnx").graph
    big = cfg.vocab_size * cfg.hidden_size // 8
    return [f"{n} {t.dtype.name} {list(t.shape)}" for n, v in graph.initializers.items()
            if (t := v.const_value) is not None and t.dtype in WIDE_FLOATS and cfg.vocab_size in tuple(t.shape)
            and t.size >= big]


@pytest.mark.parametrize(("precision", "lm_head"), [
    ("int8", "same"), ("int4", "same"), ("int4", "float"),
    pytest.param("fp8", "same", marks=pytest.mark.slow), pytest.param("int4", "int8", marks=pytest.mark.slow),
    pytest.param("int8", "float", marks=pytest.mark.slow), pytest.param("fp8", "float", marks=pytest.mark.slow),
])
def test_streamed_artifact_has_no_float32_vocabulary_tensor(precision: str, lm_head: str, tiny_checkpoint: Path,
                                                            tiny_artifact: Path, tmp_path: Path) -> None:
    cfg = Checkpoint(tiny_checkpoint).config
    assert len(float32_vocab_tensors(tiny_artifact, cfg)) == 2  # the instrument: the float32 export has both
    out = tmp_path / "streamed"
    out.mkdir()
    quantize_streamed(tiny_checkpoint, out, precision, QuantOptions(**FAST, lm_head=lm_head))
    assert float32_vocab_tensors(out, cfg) == []
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])  # the graph still loads
    if lm_head == "float":  # the checkpoint's values, exactly
        head = ir.load(out / "model.onnx").graph.initializers["lm_head.weight"].const_value
        fp32 = ir.load(tiny_artifact / "model.onnx").graph.initializers["lm_head.weight"].const_value.numpy()
        assert head.dtype == ir.DataType.BFLOAT16
        assert np.array_equal(head.numpy().astype(np.float32), fp32)


@pytest.mark.slow
def test_whole_model_float_head_is_16bit(tiny_checkpoint: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "whole"
    shutil.copytree(tiny_artifact, art)
    quantize_into(tiny_checkpoint, art, "int4", QuantOptions(**FAST, lm_head="float"))
    assert float32_vocab_tensors(art, Checkpoint(tiny_checkpoint).config) == []
