"""A layer-streamed build killed mid-way resumes at the first unfinished layer (issue 13).

The kill is an exception raised from :data:`glm_export.quantize.stream.after_unit` right after a unit (a
calibrated layer, the finished calibration, a quantized layer group) was journaled. The resumed build must
write the same bytes as an uninterrupted one, and must not compute a finished layer again: the instrument
counts the decoder layers calibration loads (``layerwise.load_layer``) and the groups handed to the quantizer
(``quantize_names``), rather than timing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from glm_export import layerwise
from glm_export.build import build_artifact
from glm_export.quantize import stream
from glm_export.quantize.rewrite import QuantOptions
from glm_export.resume import PARTIAL

FAST = {"calib_samples": 8, "calib_seq_len": 32, "accuracy_samples": 0}


class Killed(RuntimeError):
    pass


class Calls:
    """Which layers calibration ran and which layer groups were quantized, during one build."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calibrated: list[int] = []
        self.quantized: list[str] = []
        load_layer, quantize_names = layerwise.load_layer, stream.quantize_names

        def counted_load(ckpt: Any, i: int, *a: Any, **k: Any) -> Any:
            self.calibrated.append(i)
            return load_layer(ckpt, i, *a, **k)

        def counted_quantize(names: list[str], *a: Any, **k: Any) -> Any:
            self.quantized.append(stream.layer_of(names[0]))
            return quantize_names(names, *a, **k)

        monkeypatch.setattr(layerwise, "load_layer", counted_load)
        monkeypatch.setattr(stream, "quantize_names", counted_quantize)


def build(ckpt: Path, out: Path, precision: str, **opts: Any) -> None:
    build_artifact(ckpt, out, precision, quant=QuantOptions(**{**FAST, **opts}), backend="onnxruntime",
                   stream=True, validate=False, memory_check=False)


def kill_after(monkeypatch: pytest.MonkeyPatch, unit: str) -> None:
    def hook(done: str) -> None:
        if done == unit:
            raise Killed(f"killed after {unit}")
    monkeypatch.setattr(stream, "after_unit", hook)


def same_bytes(a: Path, b: Path) -> None:
    for name in ("model.onnx", "model.onnx.data"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted streamed builds (int8 with an int8 KV cache: its scales need every layer's V fold; int4)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out = {"int8": root / "int8", "int4": root / "int4"}
    build(tiny_checkpoint, out["int8"], "int8", kv_cache="int8")
    build(tiny_checkpoint, out["int4"], "int4")
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "unit", "calibrated", "quantized"), [
    # each layer is quantized as soon as calibration has run it, then counts as calibrated ("calib.N")
    ("int8", "quant.0", [0, 1], ["1", "head"]),  # killed after layer 0 was quantized, before it counted as calibrated
    ("int4", "quant.1", [1], ["head"]),
    ("int4", "calib.0", [1], ["1", "head"]),  # layer 0's statistics, hidden states and quantized bytes are kept
])
def test_a_killed_streamed_build_resumes_at_the_first_unfinished_layer(
        precision: str, unit: str, calibrated: list[int], quantized: list[str], tiny_checkpoint: Path,
        reference: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = {"kv_cache": "int8"} if precision == "int8" else {}
    out = tmp_path / precision
    kill_after(monkeypatch, unit)
    with pytest.raises(Killed):
        build(tiny_checkpoint, out, precision, **opts)
    staged = tmp_path / f".{precision}.build"
    assert not out.exists() and (staged / PARTIAL / "state.json").is_file()
    assert not (staged / "model.onnx").exists() and not (staged / "manifest.json").exists()  # nothing looks done

    monkeypatch.setattr(stream, "after_unit", None)
    calls = Calls(monkeypatch)
    build(tiny_checkpoint, out, precision, **opts)
    assert calls.calibrated == calibrated
    assert calls.quantized == quantized
    same_bytes(out, reference[precision])
    assert not (out / PARTIAL).exists() and not staged.exists()


@pytest.mark.slow
def test_a_damaged_layer_is_redone_not_trusted(tiny_checkpoint: Path, reference: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One flipped byte in layer 1's range of the data file: layer 0's quantized bytes are reused, 1 and the rest
    are quantized again; calibration reruns from layer 0 (only the last layer's hidden states are kept)."""
    out = tmp_path / "int4"
    kill_after(monkeypatch, "quant.head")
    with pytest.raises(Killed):
        build(tiny_checkpoint, out, "int4")
    staged = tmp_path / ".int4.build"
    import json

    units = json.loads((staged / PARTIAL / "state.json").read_text())["units"]
    rng = units["quant.1"]["files"][0]
    data = staged / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[(rng["start"] + rng["end"]) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))

    monkeypatch.setattr(stream, "after_unit", None)
    calls = Calls(monkeypatch)
    build(tiny_checkpoint, out, "int4")
    assert calls.calibrated == [0, 1] and calls.quantized == ["1", "head"]
    same_bytes(out, reference["int4"])
