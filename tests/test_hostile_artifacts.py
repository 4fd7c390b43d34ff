"""Artifacts and checkpoints a tester or an attacker would hand over (issue 19: D5, D6, D7, D9, D10): each must end
in the project's one-line error types (ArtifactError, CheckpointError, ConfigError, TokenizerFileError,
ChatTemplateError), never in a traceback, a foreign file's contents, or a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from glm_export.checkpoint import Checkpoint, CheckpointError, read_safetensors_header
from glm_runtime.chat_template import ChatTemplateError, TemplateDeadlineError, render_chat_template
from glm_runtime.config import ConfigError, ModelConfig
from glm_runtime.manifest import ArtifactError, confined, model_config, read_manifest
from glm_runtime.tokenizer import GLMTokenizer, TokenizerFileError


def linked_copy(artifact: Path, dst: Path, manifest: dict[str, Any] | None = None) -> Path:
    """``artifact`` as symlinks (cheap), with its own manifest.json (``manifest`` when given)."""
    dst.mkdir()
    for f in artifact.iterdir():
        if f.name != "manifest.json":
            (dst / f.name).symlink_to(f)
    original = json.loads((artifact / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(original if manifest is None else manifest))
    return dst


def manifest_of(artifact: Path) -> dict[str, Any]:
    return json.loads((artifact / "manifest.json").read_text())


# ---- D5: names confined to their directory, symlinks followed ---------------------------------------------
def test_confined_names() -> None:
    for ok in ("model.onnx", "sub/dir/x.bin", "a..b"):
        assert confined(ok), ok
    for bad in ("/etc/shadow", "../../etc/passwd", "a/../../b", "", "a\\..\\b", "x\0y", None, 5, "~/x"):
        assert not confined(bad), bad


@pytest.mark.parametrize("name", ["/etc/shadow", "../../etc/passwd", "x/../../../etc/hostname"])
def test_manifest_names_outside_the_artifact_are_refused_unread(tmp_path: Path, tiny_artifact: Path,
                                                                name: str) -> None:
    """The runtime stat-ed and hashed /etc/shadow and reported its size; now it refuses the name itself."""
    m = manifest_of(tiny_artifact)
    m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    art = linked_copy(tiny_artifact, tmp_path / "a", m)
    with pytest.raises(ArtifactError, match="leaves the artifact directory") as e:
        read_manifest(art, verify="hash")
    assert "bytes, manifest says" not in str(e.value)


def test_symlinked_files_are_still_followed(tmp_path: Path, tiny_artifact: Path) -> None:
    """Every file of this copy is a symlink out of its directory (as in the Hugging Face cache): accepted."""
    art = linked_copy(tiny_artifact, tmp_path / "a")
    assert read_manifest(art, verify="size")["files"]


def test_index_shards_outside_the_checkpoint_are_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT-0123456789")
    for shard in (str(secret), "../secret.txt"):
        index["weight_map"][name] = shard
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="leave the checkpoint directory") as e:
            Checkpoint(ckpt)
        assert "TOP-SECRET" not in str(e.value) and str(int.from_bytes(b"TOP-SECR", "little")) not in str(e.value)


def test_hf_cache_layout_with_symlinked_shards_loads(tmp_path: Path, tiny_checkpoint: Path) -> None:
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_checkpoint.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(os.path.relpath(blobs / f"blob{i}", snap))
    ckpt = Checkpoint(snap)
    ckpt.validate()


# ---- D6/D9: malformed manifests, tokenizers, configs, safetensors headers -----------------------------------
@pytest.mark.parametrize("change", ["files_list", "no_bytes", "bytes_str", "no_num_layers", "model_list",
                                    "vocab_huge", "not_object", "engine_outside"])
def test_malformed_manifests_are_one_line_errors(tmp_path: Path, tiny_artifact: Path, change: str) -> None:
    m = manifest_of(tiny_artifact)
    name = next(iter(m["files"]))
    if change == "files_list":
        m["files"] = list(m["files"])
    elif change == "no_bytes":
        del m["files"][name]["bytes"]
    elif change == "bytes_str":
        m["files"][name]["bytes"] = "12"
    elif change == "no_num_layers":
        del m["model"]["num_layers"]
    elif change == "model_list":
        m["model"] = [1, 2]
    elif change == "vocab_huge":
        m["model"]["vocab_size"] = 10**12
    elif change == "not_object":
        m = [m]
    elif change == "engine_outside":
        m["engines"] = [{"file": "/etc/passwd", "flavour": "x"}]
    art = linked_copy(tiny_artifact, tmp_path / "a", m)
    with pytest.raises((ArtifactError, ConfigError)):
        model_config(read_manifest(art, verify="size"))
    from glm_runtime.cli import app

    r = CliRunner().invoke(app, ["generate", str(art), "--prompt-ids", "1,2", "--max-new-tokens", "1",
                                 "--verify", "size"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "error:" in r.output, r.output


def test_implausible_config_sizes_are_config_errors(tiny_artifact: Path) -> None:
    d = manifest_of(tiny_artifact)["model"]
    for key, value in (("vocab_size", 10**12), ("num_layers", 10**6), ("hidden_size", 1 << 30)):
        with pytest.raises(ConfigError, match=f"{key} {value} is beyond any GLM-4 model"):
            ModelConfig.from_dict({**d, key: value})


@pytest.mark.parametrize("content", ["{}", "[]", "null", '{"model": {"type": "BPE"}}', "not json", "\xff"])
def test_malformed_tokenizer_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="latin-1")
    with pytest.raises(TokenizerFileError):
        GLMTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("content", ["[1]", "nope", '"x"'])
def test_malformed_tokenizer_config(tmp_path: Path, tiny_artifact: Path, content: str) -> None:
    shutil.copy(tiny_artifact / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerFileError):
        GLMTokenizer.from_dir(tmp_path)


def shard(path: Path, header: Any, data: bytes = b"", raw: bytes | None = None) -> Path:
    blob = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header,data,match", [
    ([1, 2], b"", "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, b"\0" * 8, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "span 4 bytes"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"w": "x"}, b"", "malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"a": "b"}}, b"\0" * 8, None),
])
def test_safetensors_headers(tmp_path: Path, header: Any, data: bytes, match: str | None) -> None:
    path = shard(tmp_path / "m.safetensors", header, data)
    if match is None:
        assert read_safetensors_header(path)["w"].shape == (2,)
        return
    with pytest.raises(CheckpointError, match=match):
        read_safetensors_header(path)


def test_foreign_file_bytes_are_not_echoed(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"SECRETPW" + b"rest of some file")
    with pytest.raises(CheckpointError) as e:
        read_safetensors_header(f)
    assert str(int.from_bytes(b"SECRETPW", "little")) not in str(e.value)


def test_validation_is_linear_in_layers(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """D10: a config saying 4000 layers ran > 100 s before reporting missing tensors."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_layers"] = 4000
    (ckpt / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="missing tensor"):
        Checkpoint(ckpt).validate()
    assert time.perf_counter() - t0 < 10


# ---- D7: the chat template cannot run unbounded -------------------------------------------------------------
HANG = ("{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}"
        "{% endfor %}{% endfor %}never")
MESSAGES = [{"role": "user", "content": "hi"}]


def test_nested_loops_stop_at_the_render_deadline() -> None:
    t0 = time.perf_counter()
    with pytest.raises(TemplateDeadlineError, match=r"did not finish rendering within 0\.3 s"):
        render_chat_template(HANG, MESSAGES, deadline_s=0.3)
    assert time.perf_counter() - t0 < 3


@pytest.mark.parametrize("template", ["{{ 'a' * 10**9 }}", "{{ [0] * 10**8 }}", "{{ 2 ** 100000 }}",
                                      "{{ (7 ** 5000) ** 5000 }}"])
def test_single_operations_that_no_deadline_can_stop_are_bounded(template: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="limit"):
        render_chat_template(template, MESSAGES)
    assert time.perf_counter() - t0 < 2


def test_deadline_leaves_normal_rendering_and_tracing_alone() -> None:
    import sys

    def tracer(frame: Any, event: str, arg: Any) -> None:
        return None

    sys.settrace(tracer)
    try:
        assert render_chat_template("{% for m in messages %}{{ m.content * 2 }}{% endfor %}", MESSAGES) == "hihi"
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


def test_a_hanging_template_is_an_error_in_chat_and_the_server(tmp_path: Path, tiny_artifact: Path) -> None:
    """``generate`` hung and each server request pinned a thread for ever (and SIGTERM no longer stopped the
    server); now both refuse within the deadline, and the server goes on serving."""
    from fastapi.testclient import TestClient

    from glm_runtime import load
    from glm_runtime.scheduler import Scheduler
    from glm_runtime.server import ServerSettings, create_app

    art = linked_copy(tiny_artifact, tmp_path / "a")
    cfg_path = art / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = HANG
    cfg_path.unlink()
    cfg_path.write_text(json.dumps(cfg))
    llm = load(art, threads=1, verify="none")
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="did not finish rendering"):
        llm.chat(MESSAGES, max_new_tokens=1)
    assert time.perf_counter() - t0 < 10
    sched = Scheduler(llm.engine, max_concurrency=1, kv_budget_bytes=1 << 30)
    try:
        with TestClient(create_app(llm, sched, ServerSettings("tiny")), raise_server_exceptions=False) as c:
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 1})
            assert r.status_code == 400 and "did not finish rendering" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 1})
            assert r.status_code == 200
    finally:
        sched.close()


def test_a_corrupt_graph_is_not_blamed_on_the_onnxruntime_version(tmp_path: Path, tiny_artifact: Path) -> None:
    from glm_runtime import load

    art = linked_copy(tiny_artifact, tmp_path / "a")
    (art / "model.onnx").unlink()
    (art / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ArtifactError) as e:
        load(art, threads=1, verify="none")
    assert "upgrade onnxruntime" not in str(e.value) and "damaged" in str(e.value), str(e.value)
