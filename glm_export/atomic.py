"""Atomic outputs: an interrupted command never leaves a file or directory that looks complete.

Everything is written under a hidden temporary name next to the target and renamed into place only when
it is whole (``os.replace`` is atomic within a filesystem). A killed process leaves at most a
``.NAME.partial-*`` directory, which the next run of the same command removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``target`` when the block finishes without error.

    ``target`` must not exist unless ``overwrite``; then the old directory is replaced only after the new
    one is complete, so a failed run keeps the previous good output.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists: choose another output or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Under the output's lock: the stale partial directories removed here are then surely a dead run's, not
    # those of a second export into the same output still writing (issue 19, D11).
    with output_lock(target):
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        staging.chmod(0o755)  # mkdtemp makes it 0700
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _publish(staging, target)


class BuildInProgressError(RuntimeError):
    pass


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def disk_full_message(staged: Path, need: int, step: str) -> str:
    """What to say when a build runs out of disk: how big the partial stage is, what is free, about what the build
    needs, and the two ways out (issue 19, D12)."""
    staged = Path(staged)
    where = staged if staged.exists() else staged.parent
    free = shutil.disk_usage(where).free
    have = tree_bytes(staged)
    gb = 1e9
    return (f"no space left on the device holding {staged.parent} during step {step!r}: the partial build in "
            f"{staged} holds {have / gb:.2f} GB, {free / gb:.2f} GB are free, and the build needs about "
            f"{need / gb:.2f} GB in all. Free at least {max(0, need - have) / gb:.2f} GB there and run the same "
            f"command again to resume, or delete {staged} and build elsewhere (-o on another disk).")


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``target`` for the block: one export or build writes an output at a time."""
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildInProgressError(f"another build or export into {target} is running (it holds {lock_path}): "
                                       "wait for it or choose another output") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _publish(staging: Path, target: Path) -> None:
    """Rename a finished staging directory into place, replacing ``target`` only once the new one is whole."""
    for f in staging.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # some writers (mkstemp, safetensors) create 0600 files
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


@contextlib.contextmanager
def staging_dir(target: str | Path, overwrite: bool = False, resume: bool = True) -> Iterator[Path]:
    """Like :func:`atomic_dir`, but the staging directory has a fixed name (``.NAME.build``) and is *kept* when
    the block fails, so a later run can resume from the steps that finished (:mod:`glm_export.resume`).

    ``resume=False`` empties it first. A lock file stops two builds from sharing one staging directory.
    It never looks like an artifact: it is hidden and the manifest is written into it last.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists: choose another output or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.build"
    with output_lock(target):
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(exist_ok=True)
        staging.chmod(0o755)
        yield staging
        _publish(staging, target)
