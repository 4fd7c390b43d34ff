"""The runtime's TensorRT engine: compatibility rules everywhere, real runs where a GPU exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from glm_runtime.engine_trt import TensorRTError, TrtEngine, check_compatibility

ENTRY = {"backend": "tensorrt-rtx", "flavour": "TensorRT for RTX", "version": "1.7.1.116", "precision": "fp8",
         "targets": ["8.9", "12.0"], "spec": {"max_batch": 1, "max_context": 256, "max_prefill": 64}}


def test_fp8_on_an_a100_is_refused_with_the_fix() -> None:
    with pytest.raises(TensorRTError, match=r"FP8 needs compute capability >= 8\.9; this GPU is 8\.0.*int8 or fp16"):
        check_compatibility(ENTRY, (8, 0), "1.7.1.116")


def test_other_version_and_other_gpu_are_refused() -> None:
    with pytest.raises(TensorRTError, match=r"built with TensorRT for RTX 1\.7\.1\.116, this host has 1\.8\.0"):
        check_compatibility(ENTRY, (8, 9), "1.8.0")
    msg = r"targets compute capabilities 8\.9, 12\.0, this GPU is 8\.6.*--target 8\.6"
    with pytest.raises(TensorRTError, match=msg):
        check_compatibility({**ENTRY, "precision": "fp16"}, (8, 6), "1.7.1.116")
    check_compatibility(ENTRY, (12, 0), "1.7.1.116")  # a listed target: fine


def gpu() -> bool:
    from glm_export.engine import gpu_present

    return gpu_present()


@pytest.mark.skipif(gpu(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_loading_says_so(tmp_path: Path) -> None:
    with pytest.raises(TensorRTError, match=r"cuda-python|no CUDA GPU|CUDA error"):
        TrtEngine(tmp_path, {**ENTRY, "precision": "fp16"}, None)  # type: ignore[arg-type]


@pytest.mark.skipif(not gpu(), reason="needs an NVIDIA GPU: the engine is built ahead of time here but cannot run")
def test_engine_logits_match_onnx_runtime(tmp_path: Path, tiny_checkpoint: Path, tiny_artifact: Path) -> None:
    """fp16 engine vs the fp32 ONNX graph in ONNX Runtime: same greedy tokens, logits within fp16 error."""
    from glm_export.build import build_artifact
    from glm_export.engine import EngineSpec, choose_backend
    from glm_export.validate import OrtGraph, pad_prompts
    from glm_runtime.manifest import model_config, read_manifest

    backend = choose_backend(None)[0]
    out = tmp_path / "trt"
    build_artifact(tiny_checkpoint, out, "fp16", backend=backend, engine=EngineSpec(backend, 1, 256, 64))
    manifest = read_manifest(out)
    engine = TrtEngine(out, manifest["engines"][0], model_config(manifest))
    cache = engine.allocate(1, 256)
    ids, pos, last = pad_prompts([list(range(100, 116))])
    ort = OrtGraph(tiny_artifact)
    ort_cache = [np.zeros((1, 2, 256, 16), np.float32) for _ in range(4)]
    for _ in range(8):
        got = engine.step(cache, ids, pos, last).copy()
        ref, ort_cache = ort.step(ids, pos, last, ort_cache)
        assert np.abs(got - ref[:, 0]).max() < 0.05
        assert got.argmax(-1).tolist() == ref[:, 0].argmax(-1).tolist()
        ids = ref[:, 0].argmax(-1).reshape(1, 1).astype(np.int64)
        pos = pos[:, -1:] + 1
        last = np.zeros((1, 1), np.int64)
    addresses = cache.addresses()
    engine.step(cache, ids, pos, last)
    assert cache.addresses() == addresses


def _weight_entry(tensors: list[dict]) -> dict:
    return {**ENTRY, "weights": {"mode": "inputs", "tensors": tensors}}


def test_weight_table_is_checked_against_the_artifact(tmp_path: Path) -> None:
    """The byte ranges a weightless engine's manifest lists are untrusted: each is checked against the file before
    any is read (GPU or not), and a bad one is a one-line error naming it."""
    from glm_runtime.engine_trt import weight_inputs

    (tmp_path / "model.onnx.data").write_bytes(bytes(1000))
    good = {"name": "w", "dtype": "FLOAT16", "shape": [10, 20], "file": "model.onnx.data", "offset": 64,
            "length": 400}
    int4 = {**good, "name": "q", "dtype": "INT4", "shape": [3, 5], "offset": 0, "length": 8}  # 15 nibbles
    assert weight_inputs(tmp_path, _weight_entry([good, int4])) == [
        ("w", tmp_path / "model.onnx.data", 64, 400), ("q", tmp_path / "model.onnx.data", 0, 8)]
    assert weight_inputs(tmp_path, ENTRY) == []  # embedded weights: nothing to bind
    bad = {
        "outside the artifact": {**good, "file": "../secret"},
        "outside the artifact ": {**good, "file": "/etc/passwd"},
        "past the end": {**good, "offset": 700},
        "shape .* say otherwise": {**good, "length": 399},
        "shape .* say otherwise ": {**good, "offset": -1},
        "does not have": {**good, "file": "other.data"},
        "malformed": {**good, "dtype": "COMPLEX128"},
        "malformed ": {k: v for k, v in good.items() if k != "length"},
        "repeated": None,
    }
    for pattern, tensor in bad.items():
        tensors = [good, good] if tensor is None else [tensor]
        with pytest.raises(TensorRTError, match=pattern.strip()) as e:
            weight_inputs(tmp_path, _weight_entry(tensors))
        assert "\n" not in str(e.value)
    with pytest.raises(TensorRTError, match="'weights' is malformed"):
        weight_inputs(tmp_path, {**ENTRY, "weights": {"mode": "sideways"}})


@pytest.mark.skipif(not gpu(), reason="needs an NVIDIA GPU: the engine is built ahead of time here but cannot run")
def test_weightless_engine_runs_as_the_embedded_one(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The same fp16 graph with its weights embedded and as bound inputs: the same greedy tokens, logits within
    fp16 rounding of each other (kernels may differ: TensorRT sees constant weights only in the first)."""
    from glm_export.build import build_artifact
    from glm_export.engine import EngineSpec, build_engine, choose_backend
    from glm_export.validate import pad_prompts
    from glm_runtime.manifest import model_config, read_manifest

    backend = choose_backend(None)[0]
    out = tmp_path / "trt"
    build_artifact(tiny_checkpoint, out, "fp16", backend=backend, engine=EngineSpec(backend, 1, 256, 64))
    manifest = read_manifest(out)
    embedded = TrtEngine(out, manifest["engines"][0], model_config(manifest))
    first = [embedded.step(embedded.allocate(1, 256), *pad_prompts([list(range(100, 116))])).copy()]
    embedded.close()
    entry = build_engine(out, EngineSpec(backend, 1, 256, 64, weights="inputs"), "fp16", 8192)
    weightless = TrtEngine(out, entry, model_config(manifest))
    assert weightless.weight_bytes == entry["weights"]["bytes"] > 0
    got = weightless.step(weightless.allocate(1, 256), *pad_prompts([list(range(100, 116))]))
    assert np.abs(got - first[0]).max() < 0.05 and got.argmax(-1).tolist() == first[0].argmax(-1).tolist()
    weightless.close()
