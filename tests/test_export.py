"""ONNX export: the graph, its numerics in ONNX Runtime against PyTorch, and the artifact around it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from glm_export import export as export_mod
from glm_export import numerics
from glm_export.checkpoint import load_model
from glm_export.cli import app
from glm_export.export import export_onnx
from glm_export.validate import Comparison, OrtGraph, compare
from glm_runtime.config import ModelConfig
from glm_runtime.manifest import ArtifactError, read_manifest


def within_rounding(result: Comparison, cfg: ModelConfig) -> bool:
    """ONNX Runtime vs PyTorch (or vs itself) within what float32 rounding allows on any CPU (numerics.py)."""
    return result.max_abs <= numerics.fp32_logit_bound(cfg, result.context, result.reference_absmax)


def prompts_for(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_graph_uses_the_standard_fused_ops(tiny_artifact: Path) -> None:
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == 24
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "RotaryEmbedding", "TensorScatter", "RMSNormalization"} <= ops
    rot = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert all({a.name: a.i for a in n.attribute} == {"interleaved": 1, "rotary_embedding_dim": 8} for n in rot)
    assert {"Transpose"} & ops <= {"Transpose"}  # activations only: weights are stored in MatMul layout
    init_names = {i.name for i in model.graph.initializer}
    assert {"layers.0.qkv.weight", "lm_head.weight", "embed.weight"} <= init_names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["past_key_0"] == ["batch", 2, "cache_len", 16]


def test_onnx_runtime_matches_pytorch_prefill_and_decode(tiny_checkpoint: Path, tiny_artifact: Path) -> None:
    model, graph = load_model(tiny_checkpoint), OrtGraph(tiny_artifact)
    result = compare(model, graph, prompts_for(model.cfg.vocab_size, [16, 9, 13], 0), decode_steps=16)
    assert within_rounding(result, model.cfg), result.to_dict()
    assert result.greedy_match


def test_greedy_32_tokens_identical_and_cache_length_is_dynamic(tiny_checkpoint: Path, tiny_artifact: Path) -> None:
    model, graph = load_model(tiny_checkpoint), OrtGraph(tiny_artifact)
    prompt = prompts_for(model.cfg.vocab_size, [16], 1)
    for cache_len in (48, 100):
        result = compare(model, graph, prompt, decode_steps=31, cache_len=cache_len)
        assert len(result.greedy_candidate[0]) == 32
        assert result.greedy_candidate == result.greedy_reference
        assert len(set(result.greedy_reference[0])) > 4, "degenerate generation would make this test weak"


def test_manifest_records_and_verifies(tiny_artifact: Path) -> None:
    manifest = read_manifest(tiny_artifact, verify="hash")
    assert manifest["model"]["num_layers"] == 2 and manifest["precision"] == "fp32"
    assert "model.onnx" in manifest["files"]
    assert "tokenizer.json" in manifest["files"] and "tokenizer_config.json" in manifest["files"]
    names = [i["name"] for i in manifest["graph"]["inputs"]]
    assert names[:3] == ["input_ids", "position_ids", "logits_index"] and len(names) == 3 + 2 * 2


def test_corrupted_artifact_is_refused(tmp_path: Path, tiny_artifact: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256 differs"):
        read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ArtifactError, match="schema version 999"):
        read_manifest(copy)


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (scripts/test.sh --all)
def test_external_data_and_hf_layout(tmp_path: Path, tiny_checkpoint_hf: Path, tiny_checkpoint: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the >2 GB path (weights in model.onnx.data) on the hf layout: same numbers as PyTorch."""
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    manifest = export_onnx(tiny_checkpoint_hf, out)
    assert (out / "model.onnx.data").stat().st_size > 70e6 and (out / "model.onnx").stat().st_size < 1e6
    assert "model.onnx.data" in manifest["files"] and manifest["source"]["layout"] == "hf"
    assert not manifest["tokenizer"]
    model = load_model(tiny_checkpoint)
    result = compare(model, OrtGraph(out), prompts_for(151552, [7, 5], 2), decode_steps=4)
    assert within_rounding(result, model.cfg)


def test_failed_export_leaves_nothing(tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod.ir, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (scripts/test.sh --all)
def test_killed_export_never_looks_complete(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "glm_export.cli", "export", str(tiny_checkpoint), "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed export must not leave the output directory"
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert partial and not (partial[0] / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="not a glm-export artifact"):
        read_manifest(partial[0])


def test_cli_refuses_existing_output_and_bad_model(tmp_path: Path, tiny_artifact: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(tiny_artifact), "-o", str(tiny_artifact)])
    assert r.exit_code == 1 and "already exists" in r.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = runner.invoke(app, ["export", str(bad), "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "model_type 'llama'" in r.output
    assert not (tmp_path / "x").exists()


def test_pytorch_cache_is_updated_in_place(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint)
    cache = model.new_cache(1, 8)
    ptrs = [c.data_ptr() for c in cache]
    out = model(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), torch.tensor([[2]]), *cache)
    assert [c.data_ptr() for c in out[1:]] == ptrs
    assert np.count_nonzero(cache[0][0, :, 3:].numpy()) == 0 and np.count_nonzero(cache[0][0, :, :3].numpy()) > 0


def test_engine_comparison_harness_detects_a_wrong_engine(tiny_artifact: Path) -> None:
    """``compare_engine`` (build's TensorRT-vs-ONNX-Runtime check, run where a GPU exists) exercised with the
    runtime's ONNX Runtime engine as the candidate: identical kernels agree; perturbed logits are caught."""
    from glm_export.validate import OrtGraph, compare_engine
    from glm_runtime.engine_ort import load_engine
    from glm_runtime.manifest import model_config, read_manifest

    manifest = read_manifest(tiny_artifact)
    engine = load_engine(tiny_artifact, manifest, model_config(manifest))
    graph = OrtGraph(tiny_artifact)
    prompts = [list(range(100, 116)), list(range(300, 309))]
    result = compare_engine(engine, graph, prompts, decode_steps=6)
    assert result.greedy_match and within_rounding(result, engine.config) and len(result.decode_max_abs) == 6
    assert len(result.greedy_candidate) == 2 and all(len(t) == 7 for t in result.greedy_candidate)

    class Skewed:
        """The same engine with a bias towards token 7 from the third step on (a wrong kernel, say)."""

        def __init__(self) -> None:
            self.config, self.calls = engine.config, 0

        def allocate(self, batch: int, cache_len: int) -> object:
            return engine.allocate(batch, cache_len)

        def step(self, *args: object) -> np.ndarray:
            self.calls += 1
            logits = engine.step(*args).copy()
            if self.calls > 2:
                logits[:, 7] += 100.0
            return logits

    bad = compare_engine(Skewed(), graph, prompts[:1], decode_steps=6)
    assert not bad.greedy_match and bad.max_abs > 50
