"""Digests used across the protocol: sha256 of exact file bytes and of canonical JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's exact bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: object) -> bytes:
    """JSON with sorted keys and no whitespace: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_json(obj: object) -> str:
    """Hex sha256 of an object's canonical JSON."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def sha256_dir(
    path: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "config.json")
) -> str:
    """Digest of a model directory: sha256 over (name, sha256 of bytes) of the matching files.

    Only weights and config count, so re-saving a tokenizer or a README does not change the
    identity of a checkpoint.
    """
    root = Path(path)
    files = sorted({p for pat in patterns for p in root.glob(pat)})
    if not files:
        raise FileNotFoundError(f"no {', '.join(patterns)} files in {root}")
    return sha256_json([[p.name, sha256_file(p)] for p in files])
