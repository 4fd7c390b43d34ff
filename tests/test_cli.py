"""The glm-export command line: random-model, build on the built-in model, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glm_export.cli import app
from glm_runtime.config import ModelConfig
from glm_runtime.manifest import read_manifest

runner = CliRunner()


def test_random_model_hf_layout(tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = runner.invoke(app, ["random-model", str(out), "--preset", "tiny", "--layout", "hf", "--seed", "3"])
    assert r.exit_code == 0, r.output
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "glm" and ModelConfig.from_pretrained(out).vocab_size == 151552
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.1.self_attn.k_proj.weight" in index["weight_map"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [151329, 151336, 151338]
    # the built-in tokenizer keeps GLM-4's rank count, so the special tokens keep their real ids
    assert sum(1 for _ in open(out / "tokenizer.model", "rb")) == 151329
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_random_model_with_real_tokenizer(tmp_path: Path, chat_reference: Path) -> None:
    out = tmp_path / "m"
    r = runner.invoke(app, ["random-model", str(out), "--tokenizer-from", str(chat_reference)])
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.model").read_bytes() == (chat_reference / "tokenizer.model").read_bytes()


def test_random_model_refuses_existing_output(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    r = runner.invoke(app, ["random-model", str(tmp_path / "m"), "--no-tokenizer"])
    assert r.exit_code == 1 and "already exists" in r.output


def test_build_without_a_model_uses_the_builtin_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLM_EXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    r = runner.invoke(app, ["build", "--precision", "fp32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out)
    assert manifest["model"]["hidden_size"] == 64 and manifest["backend"] == "onnxruntime"
    report = json.loads((out / "report.json").read_text())
    v = report["validation"]
    assert v["status"] == "ok" and v["max_abs"] <= v["bound"] < 1e-2 * v["reference_absmax"]  # numerics.py's bound
    assert "greedy tokens identical" in (out / "report.md").read_text()
    assert (tmp_path / "cache" / "builtin-tiny-v1" / "tokenizer.model").is_file()


def test_build_quantized_bad_input_is_refused_before_any_work(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    r = runner.invoke(app, ["build", str(tmp_path), "--precision", "int8", "--calibration", str(missing),
                            "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "nope.jsonl" in r.output
    r = runner.invoke(app, ["build", str(tmp_path), "--precision", "int4", "--weight-block", "100",
                            "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--weight-block 100" in r.output
    for bad in ("0", "big"):
        r = runner.invoke(app, ["build", str(tmp_path), "--precision", "int4", "--weight-block", bad,
                                "-o", str(tmp_path / "o")])
        assert r.exit_code == 2 and "choose auto, 32, 64 or 128" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_unknown_precision_is_rejected_by_the_cli(tmp_path: Path) -> None:
    r = runner.invoke(app, ["build", "--precision", "int3", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "int3" in r.output


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (scripts/test.sh --all)
def test_build_int8_on_onnxruntime_end_to_end(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "int8"
    r = runner.invoke(app, ["build", str(tiny_checkpoint), "--precision", "int8", "--backend", "onnxruntime",
                            "--calib-samples", "8", "--calib-seq-len", "64", "--accuracy-samples", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out)
    assert manifest["precision"] == "int8" and "DequantizeLinear" in manifest["graph"]["ops"]
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["accuracy"]["top1_agreement"] > 0.5
    assert "KL" in (out / "report.md").read_text()
