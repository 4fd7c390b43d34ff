"""The output layer (151552 x 4096 in GLM-4-9B) is quantized in chunks of columns (issue 13: the whole-matrix code
held 7.8 GB of float32 copies). Columns are independent (per-channel int8 / fp8 scales, int4 blocks down a column),
so the chunked result must equal the whole-matrix one bit for bit, whatever the chunk size, also when it does not
line up with the int4 clip search's own column step. The reference is the whole-matrix path of ``quantize_names``
(the code that ran before), selected by raising the width threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from glm_export import calibrate
from glm_export.checkpoint import Checkpoint, load_model
from glm_export.quantize import rewrite
from glm_export.quantize.rewrite import QuantOptions, quantize_graph


@pytest.fixture(scope="module")
def stats(tiny_checkpoint: Path) -> calibrate.Stats:
    ckpt = Checkpoint(tiny_checkpoint)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, ckpt.config.vocab_size, (24,), generator=gen).tolist() for _ in range(6)]
    # with X^T X for every module: the int4 default (awq-gptq) needs it
    return calibrate.collect(load_model(ckpt), seqs, "random", hessian=calibrate.module_order(ckpt.config.num_layers))


def quantized(artifact: Path, ckpt: Path, stats: calibrate.Stats, precision: str, options: QuantOptions
              ) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    model = ir.load(artifact / "model.onnx")
    layers = quantize_graph(model, Checkpoint(ckpt).config, precision, options, stats)
    return {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}, layers


SLOW = pytest.mark.slow  # ~14 s each (two quantizations of the tiny model's 64 x 151552 output layer)


@pytest.mark.parametrize(("precision", "extra"), [
    ("int4", {}), pytest.param("int8", {}, marks=SLOW), pytest.param("fp8", {}, marks=SLOW),
    pytest.param("int4", {"weight_zero_point": True}, marks=SLOW),
    pytest.param("int4", {"weight_method": "rtn", "weight_clip": "none"}, marks=SLOW),
    pytest.param("int4", {"lm_head": "int8"}, marks=SLOW),
    pytest.param("int4", {"int4_format": "qdq", "weight_zero_point": False}, marks=SLOW),  # TensorRT's form
])
def test_chunked_output_layer_equals_the_whole_matrix(precision: str, extra: dict[str, object], tiny_artifact: Path,
                                                      tiny_checkpoint: Path, stats: calibrate.Stats,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    options = rewrite.resolve_host_options(QuantOptions(**extra))  # type: ignore[arg-type]
    monkeypatch.setattr(rewrite, "WIDE_COLUMNS", 1 << 30)  # the whole-matrix path
    whole, whole_layers = quantized(tiny_artifact, tiny_checkpoint, stats, precision, options)
    monkeypatch.setattr(rewrite, "WIDE_COLUMNS", 65536)
    asked: list[int] = []
    monkeypatch.setattr(rewrite, "chunk_columns", lambda k: asked.append(k) or 5000)  # 31 chunks, aligned to nothing
    chunked, chunked_layers = quantized(tiny_artifact, tiny_checkpoint, stats, precision, options)
    assert asked  # the chunked path ran
    head = [n for n in chunked if n.startswith("lm_head.weight_")]
    assert head and "lm_head.weight" not in chunked  # the output layer was quantized
    assert whole.keys() == chunked.keys()
    for name, a in whole.items():
        assert a.dtype == chunked[name].dtype and a.shape == chunked[name].shape, name
        assert a.tobytes() == chunked[name].tobytes(), name
    # GPTQ's relative proxy error is per chunk when chunked (its column-weighted mean): not comparable bit for bit
    proxy = ("gptq_proxy_err", "gptq_rtn_proxy_err")
    assert ({k: v for k, v in whole_layers["lm_head.weight"].items() if k not in proxy}
            == {k: v for k, v in chunked_layers["lm_head.weight"].items() if k not in proxy})
