"""``manifest.json``: what an artifact directory holds, and the checks the runtime makes before trusting it.

The build side writes it last (so a directory without one is not an artifact); the runtime reads it first
and refuses anything it cannot vouch for: another schema version, a missing file, a file whose size or
sha256 differs from what was recorded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from glm_runtime.config import ModelConfig

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact directory the runtime must not use; the message says why and what to do."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(artifact: str | Path, verify: str = "hash") -> dict[str, Any]:
    """Load and check ``artifact/manifest.json``.

    ``verify``: ``"hash"`` checks size and sha256 of every listed file, ``"size"`` only sizes (fast for
    tens of GB of weights), ``"none"`` only the schema.
    """
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not path.is_file():
        hint = " (an interrupted build leaves no manifest: run the build again)" if artifact.is_dir() else ""
        raise ArtifactError(f"{path} not found: {artifact} is not a glm-export artifact{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}): rebuild the artifact") from e
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version!r}; this glm-runtime reads version {SCHEMA_VERSION}: "
            f"rebuild the artifact with a matching glm-export, or install the glm-runtime that made it"
        )
    problems = []
    for name, entry in manifest.get("files", {}).items():
        f = artifact / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif verify != "none" and f.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {f.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif verify == "hash" and sha256_file(f) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted or modified)")
    if problems:
        raise ArtifactError(f"artifact {artifact} failed its checks:\n  " + "\n  ".join(problems)
                            + "\nRebuild it (glm-export build / export) or copy it again.")
    return manifest


def model_config(manifest: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(manifest["model"])
