"""Resumable builds: a journal of finished steps in the build's staging directory.

``glm-export build`` stages its work in ``.NAME.build`` beside the output (see :func:`glm_export.atomic.staging_dir`)
and keeps it when a step fails, so the next run with the same inputs picks up after the last finished step
instead of re-exporting a 9 B model. Each step is recorded with

- a *key*: a hash of everything the step's output depends on (the checkpoint's file names, sizes and mtimes,
  the options, glm-export's version) chained with the previous step's key, so a changed input invalidates that
  step and every later one;
- the *inventory* of the staging directory after it (relative path -> size and sha256), so a half-written or
  tampered file is noticed and the step redone rather than trusted, even one whose size did not change (issue 19,
  D14: size alone let an edited file through). The cost: each staged file is hashed once when its step finishes
  (hashes of files an earlier step left unchanged, same size and mtime, are carried over) and once more when a
  resumed build checks it. sha256 ran at 0.72 GB/s on one core of the 2-core AMD EPYC development machine
  (shared, measured with hashlib on 256 MiB), so a 19 GB stage of GLM-4-9B costs about 27 s per pass, against
  many minutes for the export a resume skips;
- its *result* (the manifest or report section it produced), so a reused step still fills in the report.

A quantized build's export step moves its graph into ``.stages/export`` and the quantizer reads it from there
and writes the quantized graph beside the side files, so when only the quantization options change the export
is still there to quantize again. (Not hard links: onnx_ir refuses external data with more than one link.)
The exported weights stay on disk until the build finishes; the quantizer holds both at its peak anyway.

Checkpoint files are fingerprinted by size and mtime, not content: hashing 19 GB would cost as much as the
export it is meant to skip. A checkpoint edited in place without changing either would not be noticed;
``--no-resume`` starts from scratch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glm_export import atomic

JOURNAL = ".journal.json"
STAGES = ".stages"


def fingerprint_dir(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file directly in ``path``: what a checkpoint's identity is here."""
    out = []
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            st = f.stat()
            out.append((f.name, st.st_size, st.st_mtime_ns))
    return out


def fingerprint_file(path: str | Path) -> str:
    """Content hash of a small input file (a calibration set); its path alone would miss an edit."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (dict order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def inventory(root: Path, known: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Relative path -> {bytes, mtime_ns, sha256} of every file a step left in the staging directory (the journal
    aside). A file listed in ``known`` (the previous step's inventory, written by this same run) with the same size
    and mtime keeps its hash instead of being read again."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if rel.parts[0] == JOURNAL or not f.is_file():
            continue
        st = f.stat()
        prev = (known or {}).get(rel.as_posix())
        if isinstance(prev, dict) and prev.get("bytes") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns:
            digest = prev["sha256"]
        else:
            digest = fingerprint_file(f)
        out[rel.as_posix()] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return out


class BuildJournal:
    """The finished steps of one staging directory. ``plan`` decides what is reused; ``run`` does the rest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / JOURNAL
        try:
            data = json.loads(self.path.read_text())
            self.steps: list[dict[str, Any]] = data["steps"] if isinstance(data.get("steps"), list) else []
        except (OSError, ValueError, KeyError, AttributeError):
            self.steps = []
        self.reused: list[str] = []

    def plan(self, keys: list[tuple[str, str]]) -> list[str]:
        """Keep the longest run of leading steps whose keys still match and whose files are intact; clear
        everything else from the staging directory. Returns the names of the steps that will be reused."""
        n = 0
        while n < min(len(keys), len(self.steps)) and (self.steps[n].get("name"), self.steps[n].get("key")) == keys[n]:
            n += 1
        while n and not self._matches(self.steps[n - 1]["inventory"]):
            n -= 1  # e.g. quantization was interrupted half-way: the export's stage may still be whole
        self.steps = self.steps[:n]
        if n:
            self._prune(self.steps[-1]["inventory"])
        else:
            self._clear()
        self._save()
        self.reused = [s["name"] for s in self.steps]
        return self.reused

    def run(self, name: str, key: str, fn: Callable[[], Any]) -> Any:
        """The step's stored result if :meth:`plan` kept it, else ``fn()``, recorded once it returned."""
        for s in self.steps:
            if s["name"] == name:
                if s["key"] != key:
                    raise RuntimeError(f"journal step {name} planned with another key")  # programming error
                return copy.deepcopy(s["result"])
        result = fn()
        known = self.steps[-1]["inventory"] if self.steps else None
        self.steps.append({"name": name, "key": key, "inventory": inventory(self.root, known),
                           "result": copy.deepcopy(result)})
        self._save()
        return result

    def finish(self) -> None:
        """Remove the journal and the stages: what remains is the artifact."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.root / STAGES, ignore_errors=True)

    # ---- internals --------------------------------------------------------------------------------------
    def _save(self) -> None:
        atomic.write_text(self.path, json.dumps({"steps": self.steps}, indent=1, default=str) + "\n")

    def _matches(self, inv: dict[str, Any]) -> bool:
        """Every file the step left is still there with its size and content (extra files are a later step's
        leftovers). Sizes first: a truncated file costs no hashing."""
        for rel, entry in inv.items():
            f = self.root / rel
            if not isinstance(entry, dict) or not f.is_file() or f.stat().st_size != entry.get("bytes"):
                return False  # (an int entry: a journal from before content hashes; redo the step)
        return all(fingerprint_file(self.root / rel) == entry.get("sha256") for rel, entry in inv.items())

    def _prune(self, inv: dict[str, Any]) -> None:
        for rel in inventory(self.root):
            if rel not in inv:
                (self.root / rel).unlink()

    def _clear(self) -> None:
        for f in self.root.iterdir():
            if f.name == JOURNAL:
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
