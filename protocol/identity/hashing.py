"""Digests used across the protocol: sha256 of exact file bytes, of canonical JSON and of a
checkpoint directory (every file a loader reads)."""

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


# Files beside the model that the project itself writes and no loader reads: `moesaic base
# build`'s report (pretraining seconds and tokens/s: the same weights rebuilt elsewhere must keep
# their hash), an export's provenance (local delta paths) and the Hub publisher's file list
# (protocol.storage.hf, written into the directory it lists). Everything else counts.
DIGEST_EXCLUDED = frozenset({"moesaic_base.json", "moesaic.json", "moesaic-manifest.json"})


def counts_in_digest(name: str) -> bool:
    """Whether a file of a checkpoint directory is part of its digest: every file a loader may
    read (weights, config, tokenizer, generation config, index, chat template, custom code ...),
    not the project's own side files (DIGEST_EXCLUDED) nor hidden tool metadata (`.gitattributes`,
    a `.cache/` of huggingface_hub), which transformers never loads."""
    return not name.startswith(".") and name not in DIGEST_EXCLUDED


def sha256_dir(path: str | Path) -> str:
    """Digest of a model directory: sha256 over the sorted (name, sha256 of bytes) of every file
    directly in it that `counts_in_digest` (a changed tokenizer is another checkpoint).

    Refused, with the path named: a symlink (its target can change after hashing, or lie outside
    the directory) and a non-hidden subdirectory (a loader may read a subfolder; checkpoints
    are flat). FileNotFoundError when the directory is missing or has no config.json.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no model directory at {root}")
    files = []
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if not counts_in_digest(p.name):
            continue
        if p.is_symlink():
            raise ValueError(
                f"{p} is a symlink: a checkpoint directory must hold its files "
                "(copy them in, e.g. `cp -L`, or download with local_dir)"
            )
        if p.is_dir():
            raise ValueError(f"{p} is a directory: a checkpoint is a flat directory of files")
        if not p.is_file():  # a socket or a fifo
            raise ValueError(f"{p} is not a regular file")
        files.append(p)
    if not any(p.name == "config.json" for p in files):
        raise FileNotFoundError(f"no config.json in {root}: not a model directory")
    return sha256_json([[p.name, sha256_file(p)] for p in files])
