"""TensorRT engines built for real with TensorRT for RTX (ahead of time, no GPU needed)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glm_export import engine as engine_mod
from glm_export.build import build_artifact, pick_backend
from glm_export.cli import app
from glm_export.engine import EngineError, EngineSpec, check_engine, choose_backend
from glm_runtime.manifest import read_manifest

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX not installed (CI installs it)")
runner = CliRunner()


@pytest.fixture(scope="module")
def fp16_engine_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("engine") / "tiny-fp16"
    spec = EngineSpec("tensorrt-rtx", max_batch=2, max_context=256, max_prefill=64)
    build_artifact(tiny_checkpoint, out, "fp16", backend="tensorrt-rtx", engine=spec)
    return out


def test_fp16_engine_is_built_and_recorded(fp16_engine_artifact: Path) -> None:
    manifest = read_manifest(fp16_engine_artifact)
    (entry,) = manifest["engines"]
    assert entry["backend"] == "tensorrt-rtx" and entry["version"] == trt.__version__
    assert entry["precision"] == "fp16" and entry["targets"] == ["8.6", "8.9", "12.0"]
    assert entry["file"] in manifest["files"] and entry["bytes"] > 1e6
    decode, prefill = entry["profiles"]
    assert decode["shapes"]["input_ids"] == [[1, 1], [1, 1], [2, 1]]
    assert prefill["shapes"]["input_ids"][2] == [2, 64]
    assert entry["check"]["well_formed"] and "MALFORMED_ENGINE" not in entry["check"]["diagnostics"]
    assert not (fp16_engine_artifact / "engine" / "timing.cache").exists()  # TensorRT-RTX has no timing cache
    report = (fp16_engine_artifact / "report.md").read_text()
    validation = json.loads((fp16_engine_artifact / "report.json").read_text())["engine_validation"]
    if engine_mod.gpu_present():
        assert validation["status"] == "ok" and "Engine validation: OK" in report
    else:  # says plainly that the engine has not run
        assert validation["status"] == "not run" and "no NVIDIA GPU" in validation["reason"]
        assert "Engine validation: not run: no NVIDIA GPU" in report
    assert "TensorRT for RTX" in report and "weights embedded" in report


def test_engine_deserializes_with_pinned_cache_length(fp16_engine_artifact: Path) -> None:
    """The engine's own header check accepts it; its I/O has the cache length pinned to max_context."""
    data = (fp16_engine_artifact / "engine" / "tensorrt-rtx" / "model.engine").read_bytes()
    runtime = trt.Runtime(engine_mod.trt_logger(trt))
    _validity, diagnostics = runtime.get_engine_validity(data)
    assert not diagnostics & int(trt.EngineInvalidityDiagnostics.MALFORMED_ENGINE)
    assert not diagnostics & int(trt.EngineInvalidityDiagnostics.VERSION_MISMATCH)
    if engine_mod.gpu_present():
        engine = runtime.deserialize_cuda_engine(data)
        assert tuple(engine.get_tensor_shape("past_key_0"))[2] == 256


def test_corrupted_engine_is_detected(tmp_path: Path, fp16_engine_artifact: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(fp16_engine_artifact, copy)
    path = copy / "engine" / "tensorrt-rtx" / "model.engine"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    entry = read_manifest(fp16_engine_artifact)["engines"][0]
    assert not check_engine(copy, entry)["well_formed"]


def test_engine_command_rebuilds_for_another_context(tmp_path: Path, fp16_engine_artifact: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(fp16_engine_artifact, copy)
    r = runner.invoke(app, ["engine", str(copy), "--backend", "tensorrt-rtx", "--max-context", "512",
                            "--target", "8.9"])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(copy, verify="hash")
    (entry,) = manifest["engines"]
    assert entry["spec"]["max_context"] == 512 and entry["targets"] == ["8.9"]


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (scripts/test.sh --all)
def test_bf16_engine(tmp_path: Path, tiny_checkpoint: Path) -> None:
    spec = EngineSpec("tensorrt-rtx", max_context=128, max_prefill=32, targets=("8.9",))
    manifest = build_artifact(tiny_checkpoint, tmp_path / "bf16", "bf16", backend="tensorrt-rtx", engine=spec)
    assert manifest["engines"][0]["precision"] == "bf16" and manifest["dtype"] == "bfloat16"


def test_bad_engine_requests_are_clear(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(EngineError, match="no fused fp32 attention"):
        build_artifact(tiny_checkpoint, tmp_path / "x", "fp32", backend="tensorrt-rtx")
    with pytest.raises(EngineError, match=r"FP8 needs compute capability >= 8\.9.*--target 8\.6"):
        EngineSpec("tensorrt-rtx", targets=("8.6",)).check("fp8", 8192)
    with pytest.raises(EngineError, match="--max-context must be between 2 and the model's 8192"):
        EngineSpec("tensorrt-rtx", max_context=10**6).check("fp16", 8192)
    r = runner.invoke(app, ["build", str(tiny_checkpoint), "--precision", "fp32", "--backend", "tensorrt-rtx",
                            "-o", str(tmp_path / "y")])
    assert r.exit_code == 1 and "no fused fp32 attention" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "gpu_present", lambda: False)
    monkeypatch.setattr(engine_mod, "installed", lambda b: b != "tensorrt")
    assert choose_backend(None)[0] == "tensorrt-rtx"
    assert pick_backend(None, "fp32")[0] == "onnxruntime"  # fp32 never lands on TensorRT by default
    with pytest.raises(EngineError, match="backend tensorrt is not installed"):
        choose_backend("tensorrt")
    monkeypatch.setattr(engine_mod, "gpu_present", lambda: True)
    monkeypatch.setattr(engine_mod, "installed", lambda b: True)
    assert choose_backend(None)[0] == "tensorrt"
    monkeypatch.setattr(engine_mod, "installed", lambda b: b == "onnxruntime")
    assert choose_backend(None)[0] == "onnxruntime"


def test_manifest_engine_metadata_is_json(fp16_engine_artifact: Path) -> None:
    entry = json.loads((fp16_engine_artifact / "manifest.json").read_text())["engines"][0]
    assert set(entry) >= {"backend", "flavour", "version", "targets", "precision", "profiles", "spec", "build_s"}


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (scripts/test.sh --all)
@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_quantized_engines(tmp_path: Path, tiny_checkpoint: Path, precision: str) -> None:
    """The quantized graphs (fp16 base, Q/DQ / blocked DequantizeLinear) build into real engines."""
    from glm_export.quantize.rewrite import QuantOptions

    spec = EngineSpec("tensorrt-rtx", max_context=128, max_prefill=32, targets=("8.9",))
    quant = QuantOptions(calib_samples=8, calib_seq_len=64, accuracy_samples=0)
    manifest = build_artifact(tiny_checkpoint, tmp_path / precision, precision, backend="tensorrt-rtx",
                              engine=spec, quant=quant, validate=False)
    (entry,) = manifest["engines"]
    assert entry["precision"] == precision and entry["check"]["well_formed"]
    ops = set(manifest["graph"]["ops"])
    assert {"QuantizeLinear", "DequantizeLinear"} & ops if precision != "int4" else "DequantizeLinear" in ops
    assert read_manifest(tmp_path / precision)["precision"] == precision
    # The same graph with its quantized weights (int8 / fp8 / packed int4 and their scales) as network inputs
    weightless = engine_mod.build_engine(tmp_path / precision, EngineSpec(
        "tensorrt-rtx", max_context=128, max_prefill=32, targets=("8.9",), weights="inputs"), precision, 8192)
    dtypes = {t["dtype"] for t in weightless["weights"]["tensors"]}
    assert {"int8": "INT8", "fp8": "FLOAT8E4M3FN", "int4": "INT4"}[precision] in dtypes, dtypes
    assert weightless["bytes"] < entry["bytes"] / 3
    assert check_engine(tmp_path / precision, weightless)["well_formed"]


def test_external_weights_are_handed_to_the_parser_as_mapped_memory(tmp_path: Path,
                                                                     fp16_engine_artifact: Path) -> None:
    """A graph with external data (as every large model's is) is parsed with ``load_initializer`` pointers into
    memory maps of the data file instead of the parser reading (copying) it: an engine of the same size as the one
    built from the inline weights (two builds are not byte-identical: the plan has a build id), well-formed."""
    import onnx

    from glm_export.engine import _parse, _pinned_graph, import_trt, trt_logger

    art = tmp_path / "external"
    shutil.copytree(fp16_engine_artifact, art)
    model = onnx.load(str(art / "model.onnx"))
    onnx.save(model, str(art / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    rtx = import_trt("tensorrt-rtx")
    builder = rtx.Builder(trt_logger(rtx))  # owns the network: keep it alive while the parser fills it
    network = builder.create_network(1 << int(rtx.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = rtx.OnnxParser(network, trt_logger(rtx))
    maps = _parse(parser, _pinned_graph(art / "model.onnx", 256)[0], art / "model.onnx")
    assert maps is not None and len(maps) == 1 and maps[0].nbytes == (art / "model.onnx.data").stat().st_size
    spec = EngineSpec("tensorrt-rtx", max_batch=2, max_context=256, max_prefill=64)
    entry = engine_mod.build_engine(art, spec, "fp16", 8192)
    assert entry["bytes"] == (fp16_engine_artifact / entry["file"]).stat().st_size
    assert check_engine(art, entry)["well_formed"]


def _initializers(onnx_path: Path) -> dict[str, object]:
    import onnx

    return {i.name: i for i in onnx.load(str(onnx_path), load_external_data=True).graph.initializer}


def _check_weight_table(artifact: Path, entry: dict) -> None:
    """Every initializer of >= WEIGHT_INPUT_MIN elements, as onnx reads it, is an input whose listed bytes are its
    bytes; every smaller one is not."""
    tables = {t["name"]: t for t in entry["weights"]["tensors"]}
    inits = _initializers(artifact / "model.onnx")
    big = {n for n, i in inits.items() if math.prod(i.dims) >= engine_mod.WEIGHT_INPUT_MIN}
    assert set(tables) == big and big
    for name in big:
        t, init = tables[name], inits[name]
        data = (artifact / t["file"]).read_bytes()[t["offset"]:t["offset"] + t["length"]]
        assert data == init.raw_data, name
        assert t["shape"] == list(init.dims)
    assert entry["weights"]["bytes"] == sum(t["length"] for t in tables.values())


def test_weightless_engine_lists_the_weights_it_leaves_out(tmp_path: Path, fp16_engine_artifact: Path) -> None:
    """``glm-export engine --weights inputs``: a plan of kernels and shapes, a fraction of the embedded engine's
    size; the manifest lists each weight input's bytes (inline weights go to engine/<backend>/weights.bin) and the
    runtime's checked reader of that table returns the same ranges."""
    from glm_runtime.engine_trt import weight_inputs

    copy = tmp_path / "a"
    shutil.copytree(fp16_engine_artifact, copy)
    r = runner.invoke(app, ["engine", str(copy), "--backend", "tensorrt-rtx", "--weights", "inputs",
                            "--max-context", "256", "--max-prefill", "64", "--max-batch", "2"])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(copy, verify="hash")  # weights.bin is hashed like every other file
    (entry,) = manifest["engines"]
    embedded = read_manifest(fp16_engine_artifact)["engines"][0]
    assert entry["weights"]["mode"] == "inputs" and entry["spec"]["weights"] == "inputs"
    assert entry["bytes"] < embedded["bytes"] / 5 and entry["check"]["well_formed"]
    assert "engine/tensorrt-rtx/weights.bin" in manifest["files"]
    _check_weight_table(copy, entry)
    listed = [(t["name"], copy / t["file"], t["offset"], t["length"]) for t in entry["weights"]["tensors"]]
    assert weight_inputs(copy, entry) == listed
    assert entry["profiles"] == embedded["profiles"]  # the weights need no profile: same shapes as embedded


def test_weightless_engine_of_external_weights_points_into_the_data_file(tmp_path: Path,
                                                                         fp16_engine_artifact: Path) -> None:
    """A graph with external data (every 9B graph): the table points into model.onnx.data, nothing is copied."""
    import onnx

    art = tmp_path / "external"
    shutil.copytree(fp16_engine_artifact, art)
    shutil.rmtree(art / "engine")
    model = onnx.load(str(art / "model.onnx"))
    onnx.save(model, str(art / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    spec = EngineSpec("tensorrt-rtx", max_batch=2, max_context=256, max_prefill=64, weights="inputs")
    entry = engine_mod.build_engine(art, spec, "fp16", 8192)
    assert {t["file"] for t in entry["weights"]["tensors"]} == {"model.onnx.data"}
    assert not (art / "engine" / "tensorrt-rtx" / "weights.bin").exists()
    _check_weight_table(art, entry)


def test_a_failed_engine_build_leaves_nothing(tmp_path: Path, fp16_engine_artifact: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "a"
    shutil.copytree(fp16_engine_artifact, copy)
    before = (copy / "engine" / "tensorrt-rtx" / "model.engine").read_bytes()
    monkeypatch.setattr(engine_mod, "_build_to_file", lambda *a: False)
    with pytest.raises(EngineError, match="failed to build"):
        engine_mod.build_engine(copy, EngineSpec("tensorrt-rtx", weights="inputs"), "fp16", 8192)
    assert sorted(p.name for p in (copy / "engine").iterdir()) == ["tensorrt-rtx"]  # no staging left
    assert (copy / "engine" / "tensorrt-rtx" / "model.engine").read_bytes() == before
