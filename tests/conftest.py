"""Shared test fixtures.

The real GLM-4 configs and tokenizer live in ``../shared/glm4-reference`` beside the checkout (they are the
model publisher's data and are never copied into this repository). Tests that need them skip, saying why,
when that directory is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "glm4-reference"
REFERENCE_MODELS = ("glm-4-9b-chat", "glm-4-9b-chat-1m", "glm-4-9b")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/glm4-reference``; skips the test when the directory is not beside the checkout."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"GLM-4 reference files not found at {REFERENCE_DIR} (CI lays ../shared beside the clone)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def chat_reference(reference_dir: Path) -> Path:
    """The glm-4-9b-chat reference directory (config, tokenizer.model, tokenizer_config.json)."""
    return reference_dir / "glm-4-9b-chat"


# ---- generated checkpoints (random weights, real format) ------------------------------------------------
# std 0.05 instead of the default 0.02 so logits spread over a few units and parity thresholds of 1e-4 bite.
TEST_STD = 0.05


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset in the original (chatglm) layout, with the project's built-in tokenizer."""
    from glm_export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", "chatglm", seed=1, std=TEST_STD)


@pytest.fixture(scope="session")
def tiny_checkpoint_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as ``tiny_checkpoint`` in transformers' layout (model_type glm), no tokenizer."""
    from glm_export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("ckpt") / "tiny-hf", "tiny", "hf", seed=1, std=TEST_STD,
                              builtin_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """``glm-export export`` of the tiny checkpoint, fp32."""
    from glm_export.export import export_onnx

    out = tmp_path_factory.mktemp("artifact") / "tiny-onnx"
    export_onnx(tiny_checkpoint, out, "float32")
    return out


def copy_without_tokenizer(artifact: Path, dst: Path) -> Path:
    """A copy of ``artifact`` as an export from a checkpoint with no tokenizer files would leave it."""
    import json
    import shutil

    shutil.copytree(artifact, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (dst / name).unlink()
        manifest["files"].pop(name, None)
    manifest["tokenizer"] = False
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst
