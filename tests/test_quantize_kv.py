"""int8 KV cache (``glm_export/quantize/kv.py``): the cache holds round(K / s) and round(V / s) of PyTorch's K/V,
the quantized model stays as accurate, and the backends that cannot take it are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from glm_export import calibrate
from glm_export.checkpoint import load_model
from glm_export.quantize import kv as quant_kv
from glm_export.quantize.rewrite import QuantizeError, QuantOptions, check_options, options_for_backend, quantize_into

FAST = {"calib_samples": 16, "calib_seq_len": 128, "accuracy_samples": 2}


def test_cache_holds_rounded_pytorch_kv(tiny_checkpoint: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    """fp32 weights, int8 cache: after a prefill, layer 0's present * scale is PyTorch's K (after RoPE) / V within
    half a step at every written slot (independent reference: the PyTorch model's own cache)."""
    model = load_model(tiny_checkpoint)
    seqs = [[(11 * i + 5 * j) % 9000 for j in range(30)] for i in range(8)]
    stats = calibrate.collect(model, seqs)
    graph = ir.load(tiny_artifact / "model.onnx")
    info = quant_kv.quantize_cache(graph, stats.kv_absmax)
    ir.save(graph, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[3].type == "tensor(int8)" and sess.get_outputs()[1].type == "tensor(int8)"
    cfg = model.cfg
    prompt = [7, 300, 41, 9, 2200, 15, 88]
    n, cache_len = len(prompt), 12
    feeds = {"input_ids": np.array([prompt]), "position_ids": np.arange(n)[None], "logits_index": np.array([[n - 1]])}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, cfg.num_kv_heads, cache_len, cfg.head_dim), np.int8)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    ref_cache = model.new_cache(1, cache_len)
    with torch.no_grad():
        ref_logits = model(torch.tensor([prompt]), torch.arange(n)[None], torch.tensor([[n - 1]]), *ref_cache)[0]
    for i in range(cfg.num_layers):
        for j, kind in enumerate(("key", "value")):
            s = info["scales"][f"past_{kind}_{i}"]
            got = out[f"present_{kind}_{i}"].astype(np.float32) * s
            ref = ref_cache[2 * i + j].numpy()
            # layer 0 sees exact inputs: half a step; later layers also carry layer 0's rounding (measured 1.1 s)
            limit = 0.5 * s * (1 + 1e-3) + 1e-6 if i == 0 else 3 * s
            assert np.abs(got[:, :, :n] - ref[:, :, :n]).max() <= limit
            assert (out[f"present_{kind}_{i}"][:, :, n:] == 0).all()  # untouched slots
            assert np.abs(out[f"present_{kind}_{i}"]).max() > 60  # the scale uses the range, not a sliver of it
    # the logits move by the cache rounding only: measured 0.004 on logits of std 0.4
    assert 1e-5 < np.abs(out["logits"] - ref_logits.numpy()).max() < 0.05


# Measured on the tiny model (16 x 128 calibration tokens, 3 held-out sequences), mean KL vs PyTorch fp32:
# int8 weights 0.00011 -> 0.00012 with the int8 cache; int4 (b128 AWQ, mse, zero points) 0.00263 -> 0.00263.
def test_int8_weights_and_int8_cache(tiny_checkpoint: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "kv8"
    shutil.copytree(tiny_artifact, art)
    report = quantize_into(tiny_checkpoint, art, "int8", QuantOptions(kv_cache="int8", **FAST))
    json.dumps(report)
    assert 0 < report["accuracy"]["mean_kl"] < 0.0006, report["accuracy"]
    assert set(report["kv_cache"]["scales"]) == {f"past_{k}_{i}" for i in range(2) for k in ("key", "value")}
    assert "KV cache int8" in report["scheme"]
    # V is stored as the graph holds it: divided by the o_proj smoothing scales folded into qkv's V columns
    v_graph = report["kv_cache"]["scales"]["past_value_0"] * 127
    assert abs(v_graph / report["calibration"]["kv_absmax"]["past_value_0"] - 1) > 0.05


def test_quantized_cache_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(QuantizeError, match="TensorRT"):
        check_options("int8", options_for_backend(QuantOptions(kv_cache="int8"), "tensorrt-rtx"))
    with pytest.raises(QuantizeError, match="kv-cache-dtype 'fp8'"):
        check_options("int8", QuantOptions(kv_cache="fp8"))
    check_options("int4", QuantOptions(kv_cache="int8"))


def test_build_with_int8_cache_runs_in_the_runtime(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`glm-export build --kv-cache-dtype int8` end to end: the runtime (IO-bound int8 cache, in place) decodes the
    same greedy tokens as plain ONNX Runtime runs of the same graph, and plans half of fp16's cache memory."""
    from typer.testing import CliRunner

    from glm_export.cli import app
    from glm_export.validate import OrtGraph, pad_prompts
    from glm_runtime import load

    out = tmp_path / "int8-kv8"
    r = CliRunner().invoke(app, ["build", str(tiny_checkpoint), "--precision", "int8", "--backend", "onnxruntime",
                                 "--kv-cache-dtype", "int8", "--calib-samples", "8", "--calib-seq-len", "64",
                                 "--accuracy-samples", "0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    llm = load(out)
    assert llm.engine.cache_dtype == "int8"
    prompt = [5, 901, 33, 4077, 12, 640, 77, 3]
    got = llm.generate(prompt_ids=prompt, max_new_tokens=12, temperature=0, stop_token_ids=[]).output_ids

    graph = OrtGraph(out)
    assert graph.cache_dtype == np.int8
    cfg = llm.engine.config
    ids, pos, last = pad_prompts([prompt])
    cache = [np.zeros((1, cfg.num_kv_heads, 32, cfg.head_dim), np.int8) for _ in range(2 * cfg.num_layers)]
    expected = []
    for step in range(12):
        logits, cache = graph.step(ids, pos, last, cache)
        expected.append(int(logits[0, -1].argmax()))
        ids, pos = np.array([[expected[-1]]]), np.array([[len(prompt) + step]])
        last = np.zeros((1, 1), np.int64)
    assert got == expected and len(set(expected)) > 2
    plan = llm.generator.plan(1, 1024)
    assert plan.bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim  # 1 byte per value
