"""``manifest.json``: what an artifact directory holds, and the checks the runtime makes before trusting it.

The build side writes it last (so a directory without one is not an artifact); the runtime reads it first
and refuses anything it cannot vouch for: another schema version, a malformed structure, a file name that leaves
the directory, a missing file, a file whose size or sha256 differs from what was recorded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
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


def confined(name: Any) -> bool:
    """Whether ``name`` (from a manifest or a checkpoint index) stays inside its directory *as written*: relative,
    no ``..``, no backslashes or NULs. Symlinks are still followed, on purpose: the Hugging Face cache stores every
    checkpoint file as a symlink into a shared ``blobs/`` directory (issue 19, D5)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and parts[:1] != ("~",)


def _check_shape(manifest: Any, path: Path) -> list[str]:
    """What is wrong with the manifest's structure (before any of its names is used)."""
    if not isinstance(manifest, dict):
        return ["it is not a JSON object"]
    problems = []
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return [f"'files' must map file names to {{bytes, sha256}}, got a {type(files).__name__}"]
    for name, entry in files.items():
        if not confined(name):
            problems.append(f"file name {name!r} leaves the artifact directory (absolute, '..' or odd characters)")
        elif not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0
                  and isinstance(entry.get("sha256"), str)):
            problems.append(f"{name}: entry must be {{\"bytes\": int >= 0, \"sha256\": str}}, got {str(entry)[:80]}")
    engines = manifest.get("engines") or []
    if not isinstance(engines, list) or not all(isinstance(e, dict) and e.get("file") in files for e in engines):
        problems.append("'engines' must be a list of entries whose 'file' is one of the listed files")
    if not isinstance(manifest.get("model"), dict):
        problems.append("'model' (the model's configuration) is missing or not an object")
    return problems


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
    problems = _check_shape(manifest, path)
    if problems:
        raise ArtifactError(f"{path} is malformed:\n  " + "\n  ".join(problems) + "\nRebuild the artifact.")
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
    try:
        return ModelConfig.from_dict(manifest["model"])
    except (TypeError, KeyError, AttributeError) as e:  # a missing or mistyped key: not the runtime's bug
        raise ArtifactError(f"the manifest's model configuration is incomplete or malformed ({e}): rebuild the "
                            "artifact") from None
