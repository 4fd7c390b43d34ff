"""Layer-streamed quantization (``build --stream``): it never holds two decoder layers' weights, and it builds the
artifact the whole-model path builds, tensor for tensor.

The memory test instruments the checkpoint loader rather than measuring RSS (a tiny model's layers are noise next
to the interpreter): every tensor :meth:`Checkpoint.tensor` hands out is tracked until it is garbage, and whenever
a tensor of one unit (a decoder layer; the output layer with the final norm; the embedding) is read, nothing of
another unit may still be alive: not a handed-out tensor (or a view of one), not a float32 copy in the quantizer's
:class:`Weights`, not an in-memory initializer of a graph. The same instrument flags the whole-model path (the
negative control), so it is known to see what it is looking for.
"""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch

from glm_export import accuracy, calibrate, export
from glm_export.checkpoint import Checkpoint, load_model
from glm_export.quantize.rewrite import QuantOptions, Weights, quantize_into
from glm_export.quantize.stream import INLINE_BYTES, quantize_streamed

FAST = {"calib_samples": 8, "calib_seq_len": 32, "accuracy_samples": 0}


def unit(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        return f"layer {parts[1]}"
    return "head" if parts[0] in ("lm_head", "final_norm") else parts[0]


class Ledger:
    """Which units' weights are alive whenever the loader is asked for another unit's tensor."""

    def __init__(self) -> None:
        self.live: dict[str, set[int]] = {}
        self.reads: list[str] = []
        self.violations: list[str] = []
        self._next = 0

    def held(self) -> set[str]:
        units = {u for u, tokens in self.live.items() if tokens}
        for obj in gc.get_objects():
            if isinstance(obj, Weights):
                units |= {unit(n) for n, a in obj.arrays.items() if a.nbytes > INLINE_BYTES}
            elif isinstance(obj, ir.Graph):
                for n, v in obj.initializers.items():
                    t = v.const_value
                    if isinstance(t, ir.Tensor) and t.nbytes > INLINE_BYTES and n.split(".")[0] in ("layers",
                                                                                                     "lm_head"):
                        units.add(unit(n))
        return units

    def track(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Called for every tensor the loader hands out; only weights above ``INLINE_BYTES`` count (a norm
        scale of the tiny model is 256 bytes), and the scan runs when the unit changes (it is slow)."""
        u = unit(name)
        if not self.reads or self.reads[-1] != u:
            others = self.held() - {u}
            if others:
                self.violations.append(f"reading {name} while {sorted(others)} are held")
        self.reads.append(u)
        if t.numel() * t.element_size() <= INLINE_BYTES:
            return t
        token, self._next = self._next, self._next + 1
        self.live.setdefault(u, set()).add(token)
        weakref.finalize(t, self.live[u].discard, token)
        return t


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    gc.collect()  # graphs and quantizer arrays an earlier test left to the cycle collector are not this test's
    book = Ledger()
    original = Checkpoint.tensor

    def tensor(self: Checkpoint, canonical: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return book.track(canonical, original(self, canonical, dtype))

    monkeypatch.setattr(Checkpoint, "tensor", tensor)
    # The tiny model's MatMul weights are below export's 1 MB "load for real before tracing" threshold; a 9B
    # model's are all above it. Lower it so the tiny graph is traced from placeholders as the 9B one is.
    monkeypatch.setattr(export, "SMALL_TENSOR_BYTES", INLINE_BYTES)
    return book


@pytest.mark.slow
def test_streamed_build_holds_one_layer_at_a_time(ledger: Ledger, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "streamed"
    out.mkdir()
    quantize_streamed(tiny_checkpoint, out, "int8", QuantOptions(**{**FAST, "accuracy_samples": 2}))
    assert not ledger.violations, ledger.violations[:5]
    layers = {u for u in ledger.reads if u.startswith("layer")}
    assert layers == {"layer 0", "layer 1"}
    # each stage (calibration, quantization, accuracy) reads every layer in one contiguous run
    runs = [u for i, u in enumerate(ledger.reads) if u.startswith("layer") and (i == 0 or ledger.reads[i - 1] != u)]
    assert runs == ["layer 0", "layer 1"] * (len(runs) // 2), runs  # trace, calibration, quantization, accuracy


def test_the_instrument_sees_a_whole_model_load(ledger: Ledger, tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    assert any("layer 0" in v for v in ledger.violations), "the ledger missed the whole model in memory"
    del model


def test_streamed_calibration_equals_the_whole_model_run(tiny_checkpoint: Path) -> None:
    ckpt = Checkpoint(tiny_checkpoint)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, ckpt.config.vocab_size, (n,), generator=gen).tolist() for n in (20, 9, 33, 12, 17, 8,
                                                                                               40, 25)]
    hess = ["layers.1.down.weight", "lm_head.weight"]
    whole = calibrate.collect(load_model(ckpt), seqs, "n", hessian=hess)
    seen: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}

    def layer_done(i: int, modules: dict[str, calibrate.ModuleStats]) -> None:
        seen.update({k: m.hessian() for k, m in modules.items() if m.xtx is not None})
        rows.update({k: m.sample_rows() for k, m in modules.items()})

    streamed = calibrate.collect_streamed(Checkpoint(tiny_checkpoint), seqs, "n", hessian=hess, layer_done=layer_done)
    assert whole.modules.keys() == streamed.modules.keys()
    for name, a in whole.modules.items():
        b = streamed.modules[name]
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.abssum, b.abssum) and a.count == b.count, name
        assert torch.equal(a.sample_rows(), rows[name]), name
        assert b.xtx is None, f"{name}: the streamed run must drop X^T X after its layer"
        assert b.rows == [] or b.sample_rows().numel() == 0, f"{name}: the streamed run must drop its rows"
        assert (a.xtx is not None) == (name in hess), name
    assert seen.keys() == set(hess)
    for name in hess:  # the same sums in the same order
        assert torch.equal(whole.modules[name].hessian(), seen[name]), name
    assert whole.kv_absmax == streamed.kv_absmax
    assert all(torch.equal(v, streamed.kv_channel_absmax[k]) for k, v in whole.kv_channel_absmax.items())


def initializers(path: Path) -> dict[str, Any]:
    return {n: v.const_value for n, v in ir.load(path / "model.onnx").graph.initializers.items()}


def assert_same_graph(whole: Path, streamed: Path) -> tuple[dict[str, Any], list[str]]:
    """Every initializer equal in type and value, the same ops in the same order; returns the streamed artifact's
    initializers and the ops."""
    a, b = initializers(whole), initializers(streamed)
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.dtype == b[name].dtype and np.array_equal(t.numpy(), b[name].numpy()), name
    ops = [n.op_type for n in ir.load(whole / "model.onnx").graph]
    assert ops == [n.op_type for n in ir.load(streamed / "model.onnx").graph]
    return b, ops


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4", "int4/awq"])
def test_streamed_artifact_equals_the_whole_model_path(precision: str, tiny_checkpoint: Path, tiny_artifact: Path,
                                                       tmp_path: Path) -> None:
    """Same tensors, same graph. Against the artifact built before streaming existed, the one difference is the
    embedding, now stored in the checkpoint's bf16 instead of float32: its values are checked against the float32
    export's here, so the graphs compute the same logits. int4's default (AWQ then GPTQ): the streamed run quantizes
    each layer while only that layer's X^T X exists, and must still write the same tensors."""
    precision, _, method = precision.partition("/")
    opts = QuantOptions(**FAST, **({"weight_method": method} if method else {}))
    whole = tmp_path / "whole"
    shutil.copytree(tiny_artifact, whole)
    quantize_into(tiny_checkpoint, whole, precision, opts)
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    quantize_streamed(tiny_checkpoint, streamed, precision, opts)
    b, ops = assert_same_graph(whole, streamed)
    assert b["embed.weight"].dtype == ir.DataType.BFLOAT16 and "Cast" in ops
    fp32 = initializers(tiny_artifact)["embed.weight"].numpy()
    assert np.array_equal(b["embed.weight"].numpy().astype(np.float32), fp32)


@pytest.mark.slow
def test_streamed_accuracy_reference_equals_the_whole_model(tiny_checkpoint: Path, tiny_artifact: Path) -> None:
    """The layer-by-layer reference gives the numbers the float32 model gives (here on the unquantized graph,
    where both are float32 rounding away from zero)."""
    kw = {"samples": 2, "seq_len": 48, "greedy_steps": 2}
    whole = accuracy.measure(tiny_checkpoint, tiny_artifact, tiny_artifact, **kw)
    streamed = accuracy.measure(tiny_checkpoint, tiny_artifact, tiny_artifact, streamed=True, **kw)
    assert streamed["positions"] == whole["positions"] and streamed["top1_agreement"] == whole["top1_agreement"] == 1
    assert streamed["mean_kl"] < 1e-9 and whole["mean_kl"] < 1e-9
    assert streamed["ppl_reference"] == pytest.approx(whole["ppl_reference"], rel=1e-6)
    assert streamed["greedy_matched_before_divergence"] is None and "greedy_note" in streamed


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_streamed_tensorrt_form_equals_the_whole_model_path(precision: str, tiny_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    """The TensorRT form (float16 graph, Q/DQ nodes, SmoothQuant / fp8 ranges / blocked int4) streamed layer by
    layer: the tensors and graph of the whole-model path (export to float16, calibrate the float32 model, rewrite),
    the embedding included (float16 in both: the graph's type)."""
    from glm_export.quantize.rewrite import options_for_backend

    opts = options_for_backend(QuantOptions(**FAST), "tensorrt-rtx")
    whole = tmp_path / "whole"
    export.export_onnx(tiny_checkpoint, whole, "float16")
    quantize_into(tiny_checkpoint, whole, precision, opts)
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    manifest, _ = quantize_streamed(tiny_checkpoint, streamed, precision, opts)
    assert manifest["dtype"] == "float16"
    b, ops = assert_same_graph(whole, streamed)
    assert "QuantizeLinear" in ops or precision == "int4"
    assert b["embed.weight"].dtype == ir.DataType.FLOAT16
