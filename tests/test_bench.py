"""glm-export bench on the tiny model: outputs, schema, ratios and roofline recomputed from the raw samples,
the greedy check (passes for fp32, catches a wrong artifact), and the report without matplotlib."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from glm_export.cli import app
from glm_runtime.manifest import file_entry

runner = CliRunner()
TINY = ["--prompt-len", "8", "--new-tokens", "4", "--probe-gib", "0.02", "--threads", "2"]


def wrong_artifact(artifact: Path, dst: Path) -> Path:
    """A copy whose lm_head is negated: loads and runs like the real one, and its greedy tokens are wrong."""
    shutil.copytree(artifact, dst)
    model = onnx.load(str(dst / "model.onnx"))
    for i, t in enumerate(model.graph.initializer):
        if t.name == "lm_head.weight":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_entry(dst / "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> dict[str, Any]:
    """One run: PyTorch on the artifact's source checkpoint (chatglm layout, renamed for transformers), the fp32
    artifact and a wrong copy of it; batch 1 and 2; two alternating rounds; the decode profile."""
    tmp = tmp_path_factory.mktemp("bench")
    wrong = wrong_artifact(tiny_artifact, tmp / "wrong")
    out = tmp / "out"
    r = runner.invoke(app, ["bench", str(tiny_artifact), str(wrong), *TINY, "--batch", "1,2", "--repeats", "2",
                            "--profile", "--out", str(out)])
    return {"result": r, "out": out, "json": json.loads((out / "bench.json").read_text()), "artifact": tiny_artifact}


def test_outputs_and_schema(two_rounds: dict[str, Any]) -> None:
    out, res = two_rounds["out"], two_rounds["json"]
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("schema", "machine", "versions", "settings", "sides", "cases", "rounds", "checks", "summary",
                "ratios", "roofline"):
        assert key in res
    assert res["versions"]["onnxruntime"] and res["versions"]["torch"] and res["machine"]["physical_cores"] >= 1
    assert [s["kind"] for s in res["sides"]] == ["torch", "runtime", "runtime"]
    assert len(res["rounds"]) == 2
    # round 1 runs PyTorch first (the reference); round 2 another order
    assert res["rounds"][0]["order"][0] == "torch" and res["rounds"][1]["order"] != res["rounds"][0]["order"]
    sample = res["rounds"][0]["sides"]["rt0"]["cases"]["b1_p8"]["sample"]
    for metric in ("ttft_s", "tpot_s", "decode_tok_s", "prefill_tok_s", "e2e_s", "peak_rss_bytes"):
        assert sample[metric] > 0
    # the metrics are consistent with each other: 3 decode steps after the first token, 8 prompt tokens
    assert sample["decode_tok_s"] == pytest.approx(1 / sample["tpot_s"])
    assert sample["e2e_s"] == pytest.approx(sample["ttft_s"] + 3 * sample["tpot_s"])
    assert sample["prefill_tok_s"] == pytest.approx(8 / sample["ttft_s"])
    md = (out / "bench.md").read_text()
    assert "| time to first token (ms) |" in md and "runtime fp32" in md


def test_ratios_recomputed_from_raw_samples(two_rounds: dict[str, Any]) -> None:
    res = two_rounds["json"]
    lower_better = {"ttft_s", "tpot_s", "e2e_s", "peak_rss_bytes"}
    for metric in ("ttft_s", "tpot_s", "decode_tok_s", "prefill_tok_s", "e2e_s", "peak_rss_bytes"):
        torch_s = [rnd["sides"]["torch"]["cases"]["b1_p8"]["sample"][metric] for rnd in res["rounds"]]
        rt_s = [rnd["sides"]["rt0"]["cases"]["b1_p8"]["sample"][metric] for rnd in res["rounds"]]
        per_round = [t / r if metric in lower_better else r / t for t, r in zip(torch_s, rt_s, strict=True)]
        assert res["ratios"]["rt0"]["b1_p8"][metric]["median"] == pytest.approx(statistics.median(per_round))
        assert res["summary"]["rt0"]["b1_p8"][metric]["median"] == pytest.approx(statistics.median(rt_s))
        assert res["summary"]["torch"]["b1_p8"][metric]["min"] == pytest.approx(min(torch_s))


def test_roofline_recomputed(two_rounds: dict[str, Any]) -> None:
    res, artifact = two_rounds["json"], two_rounds["artifact"]
    model = onnx.load(str(artifact / "model.onnx"))
    weights = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name != "embed.weight")
    cfg = json.loads((artifact / "manifest.json").read_text())["model"]
    kv = cfg["num_layers"] * 2 * cfg["num_kv_heads"] * cfg["head_dim"] * 4 * 64  # fp32, 8 + 4 tokens -> 64 slots
    roof = res["roofline"]["sides"]["rt0"]["b1_p8"]
    assert roof["bytes_per_step"] == weights + kv
    bandwidth = [rnd["bandwidth"]["read_gb_s"] for rnd in res["rounds"]]
    assert all(bw == max(v for k, v in rnd["bandwidth"].items() if k not in ("read_gb_s", "copy_read+write"))
               for bw, rnd in zip(bandwidth, res["rounds"], strict=True))
    fractions = [rnd["sides"]["rt0"]["cases"]["b1_p8"]["sample"]["decode_tok_s"] / (bw * 1e9 / (weights + kv))
                 for bw, rnd in zip(bandwidth, res["rounds"], strict=True)]
    assert roof["fraction"] == pytest.approx(statistics.median(fractions))


def test_greedy_check_passes_for_fp32_and_flags_a_wrong_artifact(two_rounds: dict[str, Any],
                                                                  tiny_checkpoint_hf: Path) -> None:
    res, r = two_rounds["json"], two_rounds["result"]
    assert res["checks"]["rt0"]["b1_p8"]["status"] == "identical"
    assert res["checks"]["rt1"]["b1_p8"]["status"] == "WRONG"
    assert res["tokens"]["rt0"] == res["tokens"]["torch"]
    # the wrong side is not timed and gets no speed-up, the command fails, and the reports say so loudly
    assert all("rt1" not in rnd["sides"] or "sample" not in rnd["sides"]["rt1"]["cases"]["b1_p8"]
               for rnd in res["rounds"])
    assert "rt1" not in res["ratios"]
    assert r.exit_code == 1 and "WRONG" in r.output
    assert "WRONG" in (two_rounds["out"] / "bench.md").read_text()
    # the reference itself: transformers' greedy tokens for the same prompt, computed here in-process
    import torch
    import transformers

    from glm_export.bench.worker import prompt_ids

    prompt = prompt_ids(1, 8, 151552, res["settings"]["seed"])
    model = transformers.GlmForCausalLM.from_pretrained(tiny_checkpoint_hf, dtype=torch.float32,
                                                        attn_implementation="eager")
    with torch.inference_mode():
        ids = model.generate(torch.tensor(prompt), max_new_tokens=4, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert res["tokens"]["torch"]["b1_p8"] == ids[:, 8:].tolist()


def test_batch_of_two(two_rounds: dict[str, Any]) -> None:
    res = two_rounds["json"]
    check = res["checks"]["rt0"]["b2_p8"]
    assert check["status"] == "identical" and check["per_row"] == [4, 4]
    rows = res["tokens"]["torch"]["b2_p8"]
    assert len(rows) == 2 and rows[0] != rows[1]
    sample = res["rounds"][0]["sides"]["rt0"]["cases"]["b2_p8"]["sample"]
    assert sample["decode_tok_s"] == pytest.approx(2 / sample["tpot_s"])  # throughput counts both rows
    assert sample["prefill_tok_s"] == pytest.approx(16 / sample["ttft_s"])


def test_exit_code_zero_when_every_side_is_right(two_rounds: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import glm_export.bench.run as bench

    right = json.loads(json.dumps(two_rounds["json"]))
    del right["checks"]["rt1"]
    monkeypatch.setattr(bench, "run", lambda settings: right)
    r = runner.invoke(app, ["bench", str(two_rounds["artifact"]), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "bench.json").read_text())["checks"] == right["checks"]


def test_profile_finds_the_weights_of_each_matmul(two_rounds: dict[str, Any]) -> None:
    res = two_rounds["json"]
    assert "rt1" not in res["profile"]  # a wrong artifact is not profiled either
    prof = res["profile"]["rt0"]
    assert prof["decode_steps"] == 3  # 4 new tokens: the first comes from the prefill
    steps = prof["step_us"]
    assert 0 < steps["kernels"] <= steps["ort_run"] and steps["wall"] > 0
    assert "MatMul" in prof["ops_us"]
    # the tiny model's largest matrix is lm_head: the node reading the most weight bytes must read exactly it
    model = onnx.load(str(two_rounds["artifact"] / "model.onnx"))
    lm_head = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "lm_head.weight")
    assert max(n["weight_bytes"] for n in prof["top_nodes"]) == lm_head.nbytes
    md = (two_rounds["out"] / "bench.md").read_text()
    assert "Where a decode step spends its time" in md


def test_report_without_matplotlib(two_rounds: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from glm_export.bench.run import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    written = write_report(two_rounds["json"], tmp_path)
    assert sorted(p.name for p in written) == ["bench.json", "bench.md"]
    assert not (tmp_path / "bench.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "1,x"], "comma-separated list of positive integers"),
    (["--prompt-len", "0"], "comma-separated list of positive integers"),
    (["--model", "/nonexistent/ckpt"], "not found"),
])
def test_bad_settings_are_one_clear_line(tmp_path: Path, tiny_artifact: Path, args: list[str], message: str) -> None:
    r = runner.invoke(app, ["bench", str(tiny_artifact), "--out", str(tmp_path), *args])
    assert r.exit_code == 1 and message in r.output
    assert not (tmp_path / "bench.json").exists()


def test_artifact_without_its_checkpoint_asks_for_model(tmp_path: Path, tiny_artifact: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    (art / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["bench", str(art), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "pass --model" in r.output


def test_artifact_of_another_model_is_refused(tmp_path: Path, tiny_artifact: Path) -> None:
    from glm_export.random_model import write_random_model

    other = write_random_model(tmp_path / "other", "tiny", "hf", seed=1, builtin_tokenizer=False)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 32
    (other / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["bench", str(tiny_artifact), "--model", str(other), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "was not exported from" in r.output


def test_prompts_are_reproducible_and_ordinary_ids() -> None:
    from glm_export.bench.worker import prompt_ids

    a = np.array(prompt_ids(2, 64, 151552, 0))
    assert a.shape == (2, 64) and (a == np.array(prompt_ids(2, 64, 151552, 0))).all()
    assert a.max() < 151329 and not (a[0] == a[1]).all()


def test_cpu_dtype_falls_back_to_16_bit_when_float32_does_not_fit() -> None:
    from glm_export.bench.run import BenchError, cpu_torch_dtype

    n, gib = 9_400_000_000, 2**30  # GLM-4-9B: ~38 GB in float32, ~19 GB in bf16
    assert cpu_torch_dtype(n, "bfloat16", 64 * gib, None) == ("float32", "")
    dtype, note = cpu_torch_dtype(n, "bfloat16", 22 * gib, None)
    assert dtype == "bfloat16" and "not float32" in note and "22.0 GiB" in note
    # the checkpoint's own dtype is memory-mapped (page cache, no OOM): runs, and the note says pages are re-read
    dtype, note = cpu_torch_dtype(n, "bfloat16", 12 * gib, None)
    assert dtype == "bfloat16" and "memory-mapped" in note and "re-read from disk" in note
    with pytest.raises(BenchError, match="GiB is available: free memory"):  # a converted copy would not fit
        cpu_torch_dtype(n, "float32", 12 * gib, None)
    with pytest.raises(BenchError, match="try --dtype bf16"):  # asked for float32 explicitly: refused, not OOM
        cpu_torch_dtype(n, "bfloat16", 22 * gib, "float32")
    assert cpu_torch_dtype(n, "bfloat16", 22 * gib, "bfloat16") == ("bfloat16", "")
    with pytest.raises(BenchError, match="GiB is available"):
        cpu_torch_dtype(n, "bfloat16", gib // 2, "bfloat16")


def test_bench_says_when_pytorch_runs_in_bf16(tmp_path: Path, tiny_artifact: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 made not to fit (available RAM between the bf16 and the float32 need): the PyTorch side runs in
    bf16 and the report says so beside the table."""
    import glm_runtime.engine
    from glm_export.bench.run import Settings, plan, torch_rss_bytes
    from glm_export.checkpoint import Checkpoint

    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    n = Checkpoint(Path(manifest["source"]["path"])).config.num_parameters()
    avail = (torch_rss_bytes(n, "float32") + torch_rss_bytes(n, "bfloat16")) // 2
    monkeypatch.setattr(glm_runtime.engine, "available_memory_bytes", lambda: avail)
    monkeypatch.setattr("glm_export.bench.run._cuda_available", lambda: False)
    settings = Settings([tiny_artifact])
    sides, _ = plan(settings)
    assert settings.torch_dtype == "bfloat16" and "not float32" in settings.torch_dtype_note
    assert sides[0].label == "PyTorch bf16" and not any(s.strict for s in sides)
    out = tmp_path / "out"
    r = runner.invoke(app, ["bench", str(tiny_artifact), "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1",
                            "--warmup", "0", "--probe-gib", "0.02", "--threads", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "bench.md").read_text()
    assert "PyTorch runs in bf16, not float32" in md and "PyTorch bf16" in md
    assert json.loads((out / "bench.json").read_text())["settings"]["torch_dtype"] == "bfloat16"
