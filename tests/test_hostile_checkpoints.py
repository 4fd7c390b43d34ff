"""Checkpoints a tester or an attacker would hand over (issue 19): non-finite and implausible weights (D8, item 5).

The poisoned values are written here into a copy of the tiny checkpoint at known positions; each refusal must
name the checkpoint tensor and that position, end as one line (no traceback) and not advise a resume that would
meet the same weights again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from glm_export.cli import app
from glm_export.export import export_onnx
from glm_export.weight_check import WeightError, check_tensor

NORM = "transformer.encoder.final_layernorm.weight"  # small: read before tracing
HEAD = "transformer.output_layer.weight"  # large: streamed after tracing


def poisoned(src: Path, dst: Path, name: str, index: tuple[int, ...], value: float) -> Path:
    """A copy of checkpoint ``src`` with ``name[index] = value``."""
    shutil.copytree(src, dst)
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shard = dst / weight_map[name]
    tensors = load_file(shard)
    tensors[name][index] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def test_check_tensor_names_the_first_bad_position() -> None:
    t = torch.zeros(4, 5, dtype=torch.bfloat16)
    check_tensor("w", t)
    t[2, 3], t[3, 1] = float("nan"), float("inf")
    with pytest.raises(WeightError, match=r"w has 2 non-finite values \(first: nan at index \[2, 3\] of shape "
                                          r"\[4, 5\]\)"):
        check_tensor("w", t)
    big = torch.zeros(3)
    big[1] = -500.0
    check_tensor("b", big)
    with pytest.raises(WeightError, match=r"b has 1 value\(s\) beyond --max-weight-abs 100 \(first: -500 at index "
                                          r"\[1\]"):
        check_tensor("b", big, max_abs=100)


def test_export_refuses_a_nan_weight(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """D8: one NaN used to export with exit 0 (and the runtime then emitted one constant token)."""
    ckpt = poisoned(tiny_checkpoint, tmp_path / "ckpt", NORM, (17,), float("nan"))
    with pytest.raises(WeightError, match=rf"{NORM} \(in model-00001-of-00001.safetensors\) has 1 non-finite value "
                                          r"\(first: nan at index \[17\]"):
        export_onnx(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_implausible_weights_only_when_asked(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ckpt = poisoned(tiny_checkpoint, tmp_path / "ckpt", NORM, (3,), 1e4)
    r = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "out"), "--max-weight-abs", "100"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "beyond --max-weight-abs 100" in r.output and "index [3]" in r.output, r.output


def test_build_refuses_an_inf_weight_without_resume_advice(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """D8: an Inf surfaced as "validation failed: max |logit diff| nan" with advice to resume, which can only fail
    again. Now the export step names the tensor, and the message says the rerun cannot succeed."""
    ckpt = poisoned(tiny_checkpoint, tmp_path / "ckpt", HEAD, (1000, 5), float("inf"))
    out = tmp_path / "art"
    r = CliRunner().invoke(app, ["build", str(ckpt), "-o", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "Traceback" not in text, text
    assert f"{HEAD} (in model-00001-of-00001.safetensors) has 1 non-finite value (first: inf at index [1000, 5]" in text
    assert "cannot succeed until the problem below is fixed" in text and "to resume" not in text, text
    assert not out.exists()


class _Payload:
    """Unpickling this would create the file named by ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_a_pickle_checkpoint_is_refused_unread(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Kept from before issue 19: a .bin (pickle) checkpoint is refused without being unpickled."""
    import pickle

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", ckpt / "config.json")
    marker = tmp_path / "unpickled"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    r = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "safetensors" in r.output and "Traceback" not in r.output, r.output
    assert not marker.exists()


def test_a_large_tensor_is_checked_in_chunks_and_still_caught() -> None:
    """Tensors above CHECK_CHUNK elements are scanned chunk by chunk (the whole-tensor isfinite of GLM-4-9B's bf16
    output layer cost 3.4 GB): a bad value in the last chunk is still found, with its position."""
    import torch

    from glm_export.weight_check import CHECK_CHUNK, WeightError, check_tensor

    t = torch.zeros(CHECK_CHUNK + 10, dtype=torch.bfloat16).reshape(-1, 2)
    check_tensor("w", t, max_abs=1.0)
    t[-1, 1] = float("nan")
    with pytest.raises(WeightError, match=r"non-finite value \(first: nan at index \[8388612, 1\]"):
        check_tensor("w", t)
    t[-1, 1] = 3.0
    with pytest.raises(WeightError, match="beyond --max-weight-abs 1"):
        check_tensor("w", t, max_abs=1.0)
