"""Faults around builds (issue 19): concurrent exports (D11), a full disk (D12), a staged file changed in place
(D14). Faults are injected (a held lock, an ENOSPC raised from inside the export step, bytes flipped in a staged
file) rather than waited for.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import glm_export.build as build_mod
from glm_export import atomic
from glm_export.cli import app
from glm_export.export import export_onnx
from glm_export.resume import BuildJournal


def test_a_second_export_into_the_same_output_is_refused_and_harms_nothing(tmp_path: Path,
                                                                           tiny_checkpoint: Path) -> None:
    """D11: the second export deleted the first's staging directory, and the first then failed with ENOENT."""
    out = tmp_path / "x"
    first_staging = tmp_path / ".x.partial-first"
    with atomic.output_lock(out.absolute()):  # the first export, still running
        first_staging.mkdir()
        (first_staging / "model.onnx").write_bytes(b"half written")
        with pytest.raises(atomic.BuildInProgressError, match="another build or export into"):
            export_onnx(tiny_checkpoint, out)
        assert (first_staging / "model.onnx").read_bytes() == b"half written"
        r = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "-o", str(out)])
        assert r.exit_code == 1 and "Traceback" not in r.output and "another build or export" in r.output
    assert not out.exists()


def test_a_full_disk_during_build_is_one_line_with_sizes(tmp_path: Path, tiny_checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """D12: an OSError [Errno 28] traceback, resume advice, and no word on how big the stage is or what is
    needed."""

    def full(model_dir: Path, tmp: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        (tmp / "model.onnx.data").write_bytes(b"\0" * 3_000_000)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.onnx.data"))

    monkeypatch.setattr(build_mod, "export_into", full)
    out = tmp_path / "art"
    r = CliRunner().invoke(app, ["build", str(tiny_checkpoint), "-o", str(out), "--backend", "onnxruntime"])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "Traceback" not in text and "Errno" not in text, text
    assert "no space left on the device" in text and "holds 0.00 GB" in text and "GB are free" in text, text
    assert "needs about" in text and "run the same command again to resume" in text, text
    assert (tmp_path / ".art.build" / "model.onnx.data").exists()  # kept for the resume
    assert not out.exists()


def test_export_out_of_disk_is_one_line(tmp_path: Path, tiny_checkpoint: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import glm_export.export as export_mod

    def full(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise OSError(errno.ENOSPC, "No space left on device", "model.onnx.data")

    monkeypatch.setattr(export_mod, "export_into", full)
    r = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no space left on the device" in r.output and "Traceback" not in r.output
    assert not list(tmp_path.glob(".o.partial-*"))


def journal_with_one_step(root: Path, content: bytes) -> None:
    root.mkdir(exist_ok=True)
    journal = BuildJournal(root)
    journal.plan([("export", "k1")])
    journal.run("export", "k1", lambda: ((root / "model.onnx").write_bytes(content), {"ok": 1})[1])


def test_a_staged_file_changed_in_place_is_redone(tmp_path: Path) -> None:
    """D14: a staged file whose content changed but size did not was reused and published."""
    root = tmp_path / ".x.build"
    journal_with_one_step(root, b"A" * 1000)
    assert BuildJournal(root).plan([("export", "k1")]) == ["export"]  # intact: reused
    data = bytearray((root / "model.onnx").read_bytes())
    data[500] ^= 1  # same size, other content
    (root / "model.onnx").write_bytes(bytes(data))
    assert BuildJournal(root).plan([("export", "k1")]) == []
    assert not (root / "model.onnx").exists()  # cleared for the redo


def test_a_journal_from_before_content_hashes_is_not_trusted(tmp_path: Path) -> None:
    import json

    root = tmp_path / ".x.build"
    journal_with_one_step(root, b"B" * 10)
    j = json.loads((root / ".journal.json").read_text())
    j["steps"][0]["inventory"] = {"model.onnx": 10}  # the old format: sizes only
    (root / ".journal.json").write_text(json.dumps(j))
    assert BuildJournal(root).plan([("export", "k1")]) == []
