"""Atomic writes: files (temp file in the same directory, fsync, rename) and whole directories
(built in a temp directory beside the target, then renamed into place)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def check_target(out: str | Path, overwrite: bool = False) -> None:
    """Refuse an `out` that is a file, or a non-empty directory unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{out} exists and is not empty; choose a new directory or pass overwrite (--overwrite)"
        )


def fsync_tree(root: Path) -> None:
    """fsync every file directly under `root` (before a rename makes it visible)."""
    for p in root.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def install_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; an existing non-empty `out` is swapped out only with overwrite."""
    check_target(out, overwrite)
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, trash)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(trash, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temps(target: str | Path) -> int:
    """Delete the hidden temp files or directories an atomic write of `target` left behind
    when its process was killed (`.<name>.*.tmp` beside it); returns how many were removed.

    Only call this where one process owns `target` (a role's own state directory): a temp of a
    write still in progress elsewhere would be removed too.
    """
    target = Path(target)
    removed = 0
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed += 1
    return removed
