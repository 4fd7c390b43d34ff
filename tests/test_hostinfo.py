"""The machine report (`glm-export env`, `glm-runtime env`) and the int8 weight range chosen per CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from glm_export.cli import app as export_app
from glm_export.quantize.rewrite import QuantOptions, quant_int8_channel, resolve_host_options
from glm_runtime import engine_ort, hostinfo
from glm_runtime.cli import app as runtime_app
from tests.test_quantize import assert_within_rounding, one_matmul, run

runner = CliRunner()


def cpuinfo_flags() -> set[str]:
    """Independent of hostinfo: the kernel's own list of this CPU's flags."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


@pytest.mark.parametrize("which", ["glm-export", "glm-runtime"])
def test_env_reports_what_a_bug_report_needs(which: str) -> None:
    app = export_app if which == "glm-export" else runtime_app
    r = runner.invoke(app, ["env", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    import onnxruntime

    assert info["onnxruntime"]["version"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in info["onnxruntime"]["providers"]
    assert info["packages"]["glm-runtime"] and info["packages"]["numpy"] == np.__version__
    assert info["memory"]["ram_available_bytes"] > 0 and info["memory"]["disk_free_bytes"] > 0
    flags = cpuinfo_flags()
    if flags:
        assert set(info["cpu"]["isa"]) == {f for f in hostinfo.ISA_FLAGS if f in flags}
        assert info["cpu"]["int8_dot_product"] == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp",
                                                                 "i8mm"})
    if which == "glm-export":
        import torch

        assert info["torch"]["version"] == torch.__version__
    text = runner.invoke(app, ["env"]).stdout
    assert "CPU ISA" in text and "ONNX Runtime" in text and "GPU:" in text and "RAM:" in text


@pytest.mark.parametrize("dot,expected", [(True, False), (False, True), (None, True)])
def test_int8_range_follows_the_build_host(monkeypatch: pytest.MonkeyPatch, dot: bool | None, expected: bool) -> None:
    monkeypatch.setattr(hostinfo, "int8_dot_product", lambda: dot)
    assert resolve_host_options(QuantOptions()).int8_reduce_range is expected
    assert resolve_host_options(QuantOptions(backend="tensorrt-rtx")).int8_reduce_range is False
    assert resolve_host_options(QuantOptions(int8_reduce_range=True)).int8_reduce_range is True  # asked for


def test_the_range_chosen_for_this_cpu_is_exact_here() -> None:
    """ONNX Runtime's int8 GEMM with the weight range chosen for this host equals the exact product of the
    quantized operands within float32 rounding. On an AVX2-only CPU full-range weights saturate (0.3 abs error
    measured on this matmul), so choosing full range there fails this test."""
    rng = np.random.default_rng(0)  # as test_quantize's int8 test: K = 200, inputs beyond the calibrated range
    w, x = rng.normal(0, 0.05, (200, 96)).astype(np.float32), rng.normal(0, 1, (7, 200)).astype(np.float32)
    reduce = resolve_host_options(QuantOptions()).int8_reduce_range
    qmax = 63 if reduce else 127
    model = one_matmul(w)
    q, s = quant_int8_channel(w, qmax)
    a = 2.0 / 127
    from glm_export.quantize.rewrite import Rewriter

    Rewriter(model).qdq("lm_head.weight", q, s, a, np.array(0, np.int8))
    w_ref = q.astype(np.float32) * s
    x_ref = np.clip(np.round(x / a), -128, 127) * a
    assert_within_rounding(run(model, x), x_ref, w_ref)


@pytest.mark.parametrize("host_dot,range_,warns", [(False, 127, "saturate"), (True, 63, "halves"), (True, 127, None),
                                                   (False, 63, None)])
def test_runtime_warns_on_a_cpu_the_artifact_was_not_tuned_for(monkeypatch: pytest.MonkeyPatch, host_dot: bool,
                                                               range_: int, warns: str | None) -> None:
    monkeypatch.setattr(hostinfo, "cpu", lambda: {"model": "Test CPU", "int8_dot_product": host_dot, "isa": []})
    manifest = {"cpu_tuning": {"int8_weight_range": range_, "needs_int8_dot_product": range_ == 127,
                               "build_host_cpu": "Build CPU"}}
    text = engine_ort.warn_cpu_tuning(manifest)
    assert (text is None) if warns is None else (warns in text and "Test CPU" in text and "Build CPU" in text)
    assert engine_ort.warn_cpu_tuning({}) is None  # fp32 / int4 artifacts carry no tuning
