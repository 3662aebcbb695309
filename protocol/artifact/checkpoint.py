"""Checkpoints in a store: publish a HF model directory, pull one verified against the chain.

    digest, uri, size = publish_dir(open_store("file:///srv/store"), "runs/merged")
    chain.publish_checkpoint(round, digest, uri, deltas_digest)        # the merger's job
    pull(chain.latest_checkpoint(), "in/merged", max_bytes=80 << 30)   # anyone

A checkpoint in a store is every regular file of the directory as its own content-addressed
object, plus one small JSON *checkpoint manifest* object:

    {"format": "moesaic-checkpoint", "version": 1, "digest": sha256_dir(dir),
     "files": [{"name": "config.json", "sha256": "...", "size": 123}, ...]}   # sorted by name

stored as canonical JSON, so the same directory always gives the same manifest uri. The uri
on chain is the manifest's; the sha256 at its end only says which bytes it names. Trust comes
from the chain's digest: pull checks the manifest's digest against it, checks that the listed
files hash to it before downloading anything big, fetches every file
verified by its sha256 into a staging directory next to the destination, recomputes
sha256_dir (every file a loader reads: weights, config, tokenizer, generation config ...;
protocol.identity.hashing.counts_in_digest) over what arrived and only then renames the staging directory into place. Any
failure removes the staging directory: a reader sees a complete, verified checkpoint or
nothing, and an existing destination is left as it was.

Names are plain file names (no directories): `save_pretrained` writes a flat directory, and a
flat namespace is what makes "cannot escape the destination" easy to check.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.chain import Checkpoint
from protocol.identity.hashing import (
    canonical_json,
    counts_in_digest,
    sha256_dir,
    sha256_file,
    sha256_json,
)
from protocol.ops.atomic import check_target, install_dir
from protocol.storage import SHA256_RE, StorageError, Store, fetch, open_store, store_uri_of

FORMAT = "moesaic-checkpoint"
VERSION = 1
MANIFEST_NAME = "moesaic-checkpoint.json"  # the label in the manifest uri's #fragment
MANIFEST_MAX_BYTES = 4 << 20  # ~20k files; a real HF directory lists a few dozen
MAX_FILES = 10_000
MAX_NAME = 255  # longest file name on common filesystems


@dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class CheckpointManifest:
    digest: str  # sha256_dir of the directory
    files: tuple[FileEntry, ...]  # sorted by name

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        files = [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in self.files]
        doc = {"format": FORMAT, "version": VERSION, "digest": self.digest, "files": files}
        return canonical_json(doc)


# ---------------------------------------------------------------------------- names, digests


def check_name(name: object) -> str:
    """A manifest file name that can only mean a file directly inside the destination."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"unsafe file name in checkpoint manifest: {name!r} (empty or not text)")
    bad = (
        name in (".", "..")
        or "/" in name
        or "\\" in name  # a separator on Windows, and never in a file save_pretrained writes
        or len(name.encode()) > MAX_NAME
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or name.endswith(".part")  # the downloader's temp suffix: keep the namespaces apart
    )
    if bad:
        raise ValueError(f"unsafe file name in checkpoint manifest: {name!r}")
    return name


def expected_digest(files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """sha256_dir of a directory holding exactly `files`, computed from their listed sha256.

    Mirrors protocol.identity.hashing.sha256_dir (the same files, `counts_in_digest`, the same
    [name, sha256] list), so a manifest can be checked against the chain before its files are
    downloaded: a swapped tokenizer file is refused before anything big arrives.
    """
    picked = sorted((f.name, f.sha256) for f in files if counts_in_digest(f.name))
    if "config.json" not in {name for name, _ in picked}:
        raise ValueError("checkpoint manifest lists no config.json")
    return sha256_json([list(p) for p in picked])


def build_manifest(directory: str | Path) -> CheckpointManifest:
    """The manifest of a local directory (hashes every file; publish_dir hashes while uploading)."""
    root = Path(directory)
    files = tuple(
        FileEntry(p.name, sha256_file(p), p.stat().st_size) for p in _checkpoint_files(root)
    )
    return CheckpointManifest(sha256_dir(root), files)


def _checkpoint_files(root: Path) -> list[Path]:
    """Every regular file directly in root, sorted; a subdirectory is refused, not skipped,
    so a publisher never believes it shipped something it did not."""
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {root}")
    files = []
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if p.is_symlink():  # sha256_dir refuses them too: what is published is what was hashed
            raise ValueError(f"{p} is a symlink: a checkpoint directory must hold its files")
        if p.is_dir():
            raise ValueError(f"{p} is a directory: a checkpoint is a flat directory of files")
        if not p.is_file():  # a socket, fifo or dangling link
            raise ValueError(f"{p} is not a regular file")
        files.append(p)
    for p in files:
        check_name(p.name)
    return files


# ---------------------------------------------------------------------------- publish


def publish_dir(
    store: Store, directory: str | Path, *, progress: bool = False
) -> tuple[str, str, int]:
    """Upload every file of a checkpoint directory and its manifest.

    Returns (digest, manifest_uri, total_bytes): the digest (sha256_dir) and uri to publish on
    chain, and the bytes of the files a pull downloads (the manifest not counted). Raises
    ValueError if the directory changed while it was being uploaded.
    """
    root = Path(directory)
    digest = sha256_dir(root)
    entries = []
    for path in _checkpoint_files(root):
        # put hashes while it copies: one read per file, and the entry describes what was stored
        ref = store.put(path, name=path.name, progress=progress)
        entries.append(FileEntry(path.name, ref.sha256, ref.size))
    manifest = CheckpointManifest(digest, tuple(entries))
    if expected_digest(manifest.files) != digest:
        raise ValueError(f"{root} changed while it was being published; publish it again")
    fd, tmp = tempfile.mkstemp(prefix=".moesaic-checkpoint-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(manifest.to_json())
        ref = store.put(tmp, name=MANIFEST_NAME)
    finally:
        os.unlink(tmp)
    return digest, ref.uri, manifest.total_bytes


# ---------------------------------------------------------------------------- parse


def parse_manifest(data: bytes, uri: str = "") -> CheckpointManifest:
    """A checkpoint manifest from untrusted bytes, validated strictly; ValueError says why."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint manifest {uri} is not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "version", "digest", "files"}:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(
            f"checkpoint manifest {uri} must have exactly format, version, digest, files; got {keys}"
        )
    if doc["format"] != FORMAT or doc["version"] != VERSION or isinstance(doc["version"], bool):
        raise ValueError(
            f"checkpoint manifest {uri}: format {doc['format']!r} version {doc['version']!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    digest = _hex(doc["digest"], "digest")
    files = doc["files"]
    if not isinstance(files, list) or not files or len(files) > MAX_FILES:
        raise ValueError(f"checkpoint manifest {uri}: files must be a list of 1..{MAX_FILES}")
    entries = tuple(_entry(e) for e in files)
    names = [e.name for e in entries]
    folded = {n.casefold() for n in names}  # also one file on case-insensitive filesystems
    if len(folded) != len(names):
        raise ValueError(f"checkpoint manifest {uri}: duplicate file names")
    if names != sorted(names):
        raise ValueError(f"checkpoint manifest {uri}: files are not sorted by name")
    return CheckpointManifest(digest, entries)


def _hex(value: object, what: str) -> str:
    if not isinstance(value, str) or not SHA256_RE.fullmatch(value):
        raise ValueError(f"checkpoint manifest: {what} must be 64 lowercase hex chars: {value!r}")
    return value


def _entry(e: object) -> FileEntry:
    if not isinstance(e, dict) or set(e) != {"name", "sha256", "size"}:
        raise ValueError(f"checkpoint manifest: a file entry needs name, sha256, size: {e!r}")
    size = e["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"checkpoint manifest: bad size for {e['name']!r}: {size!r}")
    return FileEntry(check_name(e["name"]), _hex(e["sha256"], f"sha256 of {e['name']!r}"), size)


# ---------------------------------------------------------------------------- pull


def manifest_sha256(uri: str) -> str:
    """The sha256 a content-addressed object uri names (its last path segment)."""
    sha = urlsplit(uri).path.rpartition("/")[2].lower()
    if not SHA256_RE.fullmatch(sha):
        raise ValueError(f"checkpoint uri {uri!r} does not end with a sha256")
    return sha


def pull(
    checkpoint: Checkpoint,
    out_dir: str | Path,
    *,
    store_options: Mapping[str, Any] | None = None,
    max_bytes: int,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Download the checkpoint a chain record names into out_dir, verified against its digest.

    `max_bytes` caps the files' total size (checked from the manifest before downloading).
    out_dir must not exist or be empty unless `overwrite`. On any failure (StorageError for
    transfer and integrity failures, ValueError for a bad manifest or digest) nothing is left
    behind and an existing out_dir is untouched.
    """
    out = Path(out_dir)
    check_target(out, overwrite)
    options = dict(store_options or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.pull-", suffix=".tmp"))
    try:
        manifest = _fetch_manifest(checkpoint, work, max_bytes, options)
        staging = work / "checkpoint"
        staging.mkdir()
        _fetch_files(checkpoint.uri, manifest, staging, options, progress)
        got = sha256_dir(staging)
        if got != checkpoint.digest:  # unreachable unless hashing rules drift; cheap insurance
            raise ValueError(
                f"downloaded checkpoint hashes to {got}, chain says {checkpoint.digest}"
            )
        install_dir(staging, out, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _fetch_manifest(
    checkpoint: Checkpoint, work: Path, max_bytes: int, options: dict
) -> CheckpointManifest:
    """Fetch and validate the manifest, and bind it to the chain record before any big download."""
    uri = checkpoint.uri
    path = fetch(
        uri,
        work / "manifest.json",
        expected_sha256=manifest_sha256(uri),
        max_bytes=MANIFEST_MAX_BYTES,
        resume=False,
        **options,
    )
    manifest = parse_manifest(path.read_bytes(), uri)
    if manifest.digest != checkpoint.digest:
        raise ValueError(
            f"digest mismatch: manifest {uri} is for checkpoint {manifest.digest}, "
            f"the chain published {checkpoint.digest} for round {checkpoint.round}"
        )
    listed = expected_digest(manifest.files)
    if listed != checkpoint.digest:
        raise ValueError(
            f"digest mismatch: the model files manifest {uri} lists hash to "
            f"{listed}, not the chain's {checkpoint.digest}"
        )
    if manifest.total_bytes > max_bytes:
        raise StorageError(
            "too_large", uri, f"checkpoint is {manifest.total_bytes} bytes, cap is {max_bytes}"
        )
    return manifest


def _fetch_files(
    uri: str, manifest: CheckpointManifest, staging: Path, options: dict, progress: bool
) -> None:
    """Every listed file from the manifest's store, each verified by its sha256 and size."""
    store = open_store(store_uri_of(uri), **options)
    try:
        for f in manifest.files:
            _fetch_file(store, f, staging / f.name, progress)
    finally:
        if close := getattr(store, "close", None):  # the http client holds a connection pool
            close()


def _fetch_file(store: Store, f: FileEntry, dest: Path, progress: bool) -> None:
    try:
        # max_bytes = the listed size: a bigger object is refused before it is streamed
        store.get(f.sha256, dest, expected_sha256=f.sha256, max_bytes=f.size, progress=progress)
    except StorageError as e:
        hint = " (the stored object is corrupt or was tampered with)"
        message = f"checkpoint file {f.name!r}: {e.message}"
        message += hint if e.code in ("digest_mismatch", "too_large") else ""
        raise StorageError(e.code, e.uri, message, transient=e.transient) from e
    if (size := dest.stat().st_size) != f.size:  # smaller: larger was refused by max_bytes
        raise ValueError(
            f"checkpoint manifest says {f.name!r} is {f.size} bytes; "
            f"the object with its sha256 is {size}"
        )
