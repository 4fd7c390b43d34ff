"""The built-in tiny model: what every command uses when no model is given.

It is generated on first use (random weights, fixed seed, the project's own tokenizer) into a cache
directory, so it works offline on a fresh install and nothing large ships in the wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

from glm_export.progress import console

BUILTIN_VERSION = 1  # bump when the preset, seed or tokenizer changes, so stale caches are not reused
BUILTIN_SEED = 0


def cache_root() -> Path:
    if os.environ.get("GLM_EXPORT_CACHE"):
        return Path(os.environ["GLM_EXPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm-export"


def builtin_model_dir() -> Path:
    """Path of the built-in tiny checkpoint, writing it (atomically) the first time."""
    from glm_export.random_model import write_random_model

    path = cache_root() / f"builtin-tiny-v{BUILTIN_VERSION}"
    if not (path / "config.json").is_file():
        console.print(f"no model given: generating the built-in tiny GLM-4 (random weights) in {path}")
        write_random_model(path, "tiny", "chatglm", seed=BUILTIN_SEED, overwrite=True)
    return path


def resolve_model(model: Path | None) -> Path:
    return builtin_model_dir() if model is None else Path(model)
