"""``glm-export build`` is resumable: a finished step whose inputs did not change is not redone, and a build that
stops half-way leaves no artifact, only a hidden staging directory the next run picks up."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

import pytest

from glm_export import build as build_mod
from glm_export.atomic import BuildInProgressError
from glm_export.quantize.rewrite import QuantOptions
from glm_runtime import hostinfo
from glm_runtime.manifest import read_manifest


def quant(alpha: float) -> QuantOptions:
    return QuantOptions(calib_samples=8, calib_seq_len=32, smoothquant_alpha=alpha, accuracy_samples=0)


class Boom(RuntimeError):
    pass


def fail(*args: Any, **kwargs: Any) -> Any:
    raise Boom("injected failure")


def calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count calls of ``build_mod.<name>`` while still running it."""
    seen: list[int] = []
    real = getattr(build_mod, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, name, counted)
    return seen


def stop_at_validation(monkeypatch: pytest.MonkeyPatch, *args: Any, **kwargs: Any) -> None:
    """Run a build that fails at its validation step (after export and quantization finished)."""
    with monkeypatch.context() as m:
        m.setattr(build_mod, "validate_artifact", fail)
        with pytest.raises(Boom):
            build_mod.build_artifact(*args, **kwargs)


def staged(out: Path) -> Path:
    return out.parent / f".{out.name}.build"


def file_hashes(artifact: Path) -> dict[str, str]:
    """The artifact's files by hash, reports aside (they carry timings)."""
    files = read_manifest(artifact)["files"]
    assert "model.onnx" in files
    return {name: entry["sha256"] for name, entry in files.items() if not name.startswith("report.")}


def test_failed_step_leaves_no_artifact_and_the_rerun_resumes(tmp_path: Path, tiny_checkpoint: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "int8"
    stop_at_validation(monkeypatch, tiny_checkpoint, out, "int8", quant=quant(0.5), backend="onnxruntime")
    assert not out.exists()
    assert not (staged(out) / "manifest.json").exists()  # the staging directory never looks like an artifact
    journal = json.loads((staged(out) / ".journal.json").read_text())
    assert [s["name"] for s in journal["steps"]] == ["export", "quantize"]

    # Same inputs: export and quantization are reused, validation (the failed step) runs.
    exports, quantizes, validations = (calls(monkeypatch, n) for n in
                                       ("export_into", "quantize_into", "validate_artifact"))
    build_mod.build_artifact(tiny_checkpoint, out, "int8", quant=quant(0.5), backend="onnxruntime")
    assert (len(exports), len(quantizes), len(validations)) == (0, 0, 1)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] == ["export", "quantize"] and report["quantization"]["layers"]
    manifest = read_manifest(out, verify="hash")
    assert manifest["precision"] == "int8"
    full = hostinfo.int8_dot_product() is True  # the weight range is chosen for the build host, and recorded
    assert manifest["cpu_tuning"]["int8_weight_range"] == (127 if full else 63)
    assert not staged(out).exists() and not (out / ".journal.json").exists() and not (out / ".stages").exists()

    # The resumed artifact is the artifact a build from scratch makes.
    fresh = tmp_path / "fresh"
    build_mod.build_artifact(tiny_checkpoint, fresh, "int8", quant=quant(0.5), backend="onnxruntime", resume=False)
    assert file_hashes(out) == file_hashes(fresh)


def test_changed_quantization_options_reuse_the_export_only(tmp_path: Path, tiny_checkpoint: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "int8"
    stop_at_validation(monkeypatch, tiny_checkpoint, out, "int8", quant=quant(0.5), backend="onnxruntime")
    # A new alpha must start again from the exported graph (kept in the export's stage), not quantize the
    # quantized graph.
    exports, quantizes = calls(monkeypatch, "export_into"), calls(monkeypatch, "quantize_into")
    build_mod.build_artifact(tiny_checkpoint, out, "int8", quant=quant(0.8), backend="onnxruntime", validate=False)
    assert (len(exports), len(quantizes)) == (0, 1)
    fresh = tmp_path / "fresh"
    build_mod.build_artifact(tiny_checkpoint, fresh, "int8", quant=quant(0.8), backend="onnxruntime",
                             validate=False, resume=False)
    assert file_hashes(out) == file_hashes(fresh)
    assert json.loads((out / "report.json").read_text())["resumed"] == ["export"]


def test_a_damaged_staged_file_is_redone_not_trusted(tmp_path: Path, tiny_checkpoint: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "fp32"
    stop_at_validation(monkeypatch, tiny_checkpoint, out, "fp32", backend="onnxruntime")
    with open(staged(out) / "model.onnx", "ab") as f:  # e.g. a disk that filled up while copying
        f.write(b"\0")
    exports = calls(monkeypatch, "export_into")
    build_mod.build_artifact(tiny_checkpoint, out, "fp32", backend="onnxruntime")
    assert len(exports) == 1
    assert json.loads((out / "report.json").read_text())["validation"]["status"] == "ok"


@pytest.mark.slow  # > 20 s on 2 cores: runs in CI (scripts/test.sh --all)
def test_no_resume_starts_over_and_a_changed_checkpoint_invalidates(tmp_path: Path, tiny_checkpoint: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "fp32"
    stop_at_validation(monkeypatch, tiny_checkpoint, out, "fp32", backend="onnxruntime")
    exports = calls(monkeypatch, "export_into")
    build_mod.build_artifact(tiny_checkpoint, out, "fp32", backend="onnxruntime", validate=False, resume=False)
    assert len(exports) == 1

    # A checkpoint whose files changed (same names, new mtime) is exported again.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    out2 = tmp_path / "b"
    stop_at_validation(monkeypatch, ckpt, out2, "fp32", backend="onnxruntime")
    config = ckpt / "config.json"
    config.write_text(config.read_text() + " ")
    build_mod.build_artifact(ckpt, out2, "fp32", backend="onnxruntime", validate=False)
    assert len(exports) == 3


def test_a_second_build_into_the_same_output_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "x"
    with open(tmp_path / ".x.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(BuildInProgressError, match="another build"):
            build_mod.build_artifact(tiny_checkpoint, out, "fp32", backend="onnxruntime")
    assert not out.exists()
