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

A step that runs long over many units (the streamed build's calibration and quantization, one decoder layer
at a time) also keeps a *partial* journal (:class:`Partial`, ``.partial/``): every finished unit's files (or the
byte range it appended to a shared file) with their sha256 and its result, under the step's key. A killed build
resumes that step at the first unit whose record is missing or whose bytes no longer match; the partial journal
is removed once the step finishes (the step's own inventory takes over).

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
PARTIAL = ".partial"


def fingerprint_dir(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file directly in ``path``: what a checkpoint's identity is here."""
    out = []
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            st = f.stat()
            out.append((f.name, st.st_size, st.st_mtime_ns))
    return out


def fingerprint_file(path: str | Path, start: int = 0, end: int | None = None) -> str:
    """Content hash of a file (a calibration set, a staged file), or of its bytes ``[start, end)``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
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
        everything else from the staging directory, except the partial journal of the first step to run (when
        its key still matches) and the files it lists. Returns the names of the steps that will be reused."""
        n = 0
        while n < min(len(keys), len(self.steps)) and (self.steps[n].get("name"), self.steps[n].get("key")) == keys[n]:
            n += 1
        while n and not self._matches(self.steps[n - 1]["inventory"]):
            n -= 1  # e.g. quantization was interrupted half-way: the export's stage may still be whole
        self.steps = self.steps[:n]
        keep: set[str] = set()
        if n < len(keys) and Partial.stored_key(self.root) == keys[n][1]:
            keep = Partial(self.root, keys[n][1]).owned()
        if n:
            self._prune(self.steps[-1]["inventory"], keep)
        else:
            self._clear(keep)
        self._save()
        self.reused = [s["name"] for s in self.steps]
        return self.reused

    def partial(self, key: str) -> Partial:
        """The unit journal of the step with ``key`` (what :meth:`plan` kept of it, or a fresh one)."""
        return Partial(self.root, key)

    def run(self, name: str, key: str, fn: Callable[[], Any]) -> Any:
        """The step's stored result if :meth:`plan` kept it, else ``fn()``, recorded once it returned."""
        for s in self.steps:
            if s["name"] == name:
                if s["key"] != key:
                    raise RuntimeError(f"journal step {name} planned with another key")  # programming error
                return copy.deepcopy(s["result"])
        result = fn()
        shutil.rmtree(self.root / PARTIAL, ignore_errors=True)  # the step's inventory covers its files now
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

    def _prune(self, inv: dict[str, Any], keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        for rel in inventory(self.root):
            if rel not in inv and rel not in keep:
                (self.root / rel).unlink()

    def _clear(self, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        for f in sorted(self.root.rglob("*"), reverse=True):  # children before their directories
            rel = f.relative_to(self.root).as_posix()
            if f.name == JOURNAL or rel in keep or any(k.startswith(rel + "/") for k in keep):
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)


class Partial:
    """The finished units (decoder layers) of one long step, so a killed build resumes at the first unfinished one.

    Each unit is recorded, in order, with the files it wrote (staging-relative path, optionally the byte range
    ``[start, end)`` it appended to a shared file, and its sha256) and a JSON-able result. :meth:`valid` trusts a
    unit only while every one of its byte ranges still hashes to its record, so a half-written or altered layer is
    redone, never reused; :meth:`truncate` forgets a unit and every later one. State is written atomically after
    each unit (``.partial/state.json``), keyed by the step's key: another key (changed inputs) starts over.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key = Path(root), key
        self.dir = self.root / PARTIAL
        self.path = self.dir / "state.json"
        self.units: dict[str, dict[str, Any]] = {}
        if self.stored_key(self.root) == key:
            try:
                self.units = json.loads(self.path.read_text())["units"]
            except (OSError, ValueError, KeyError, TypeError):
                self.units = {}
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._checked: set[str] = set()

    @staticmethod
    def stored_key(root: Path) -> str | None:
        try:
            key = json.loads((Path(root) / PARTIAL / "state.json").read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return None
        return key if isinstance(key, str) else None

    def owned(self) -> set[str]:
        """Staging-relative paths of every file this journal vouches for (kept by :meth:`BuildJournal.plan`)."""
        out = {f"{PARTIAL}/state.json"}
        for u in self.units.values():
            out |= {f["path"] for f in u.get("files", [])}
        return out

    def valid(self, unit: str) -> bool:
        """Whether ``unit`` finished and its bytes are still what was recorded (hashed once per run)."""
        u = self.units.get(unit)
        if u is None:
            return False
        if unit in self._checked:
            return True
        for f in u.get("files", []):
            p = self.root / f["path"]
            end = f.get("end")
            if not p.is_file() or (end is not None and p.stat().st_size < end):
                return False
            if end is None and p.stat().st_size != f.get("bytes"):
                return False
            if fingerprint_file(p, f.get("start", 0), end) != f["sha256"]:
                return False
        self._checked.add(unit)
        return True

    def result(self, unit: str) -> Any:
        return copy.deepcopy(self.units[unit].get("result"))

    def record(self, unit: str, files: list[dict[str, Any]], result: Any = None) -> None:
        """``files``: {"path"} (a whole file, hashed here) or {"path", "start", "end", "sha256"} (a byte range
        the caller hashed while writing it)."""
        entries = []
        for f in files:
            f = dict(f)
            if "sha256" not in f:
                p = self.root / f["path"]
                f["bytes"] = p.stat().st_size
                f["sha256"] = fingerprint_file(p)
            entries.append(f)
        self.units[unit] = {"files": entries, "result": copy.deepcopy(result)}
        self._checked.add(unit)
        self._save()

    def truncate(self, units: list[str]) -> None:
        """Forget ``units`` (the first unit to redo and every later one)."""
        for u in units:
            self.units.pop(u, None)
            self._checked.discard(u)
        self._save()

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path, json.dumps({"key": self.key, "units": self.units}, default=str) + "\n")
