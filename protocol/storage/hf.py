"""Publish and pull checkpoint directories on the Hugging Face Hub, verified file by file.

    ckpt = publish_checkpoint("runs/merged", "org/moesaic-math")     # -> repo, commit, manifest
    pull_checkpoint(ckpt, "in/merged", max_bytes=80 << 30)

publish writes moesaic-manifest.json (every file's sha256 and size, canonical JSON) into the
folder and uploads the folder in one commit; what goes on chain is (repo, commit, sha256 of
the manifest). pull fetches the manifest first, checks its sha256 and the total size against
the cap, then downloads exactly the listed files into a staging directory next to dest,
checks each file's size and sha256, and renames the directory into place: a reader sees a
complete, verified checkpoint or nothing. The Hub's own git/LFS hashes are not trusted for
this: a repo's owner can rewrite a branch, so pin the commit and check our manifest.

huggingface_hub is optional: it is imported only when no `api` object is passed (tests pass a
local stand-in with the same three methods).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from protocol.identity.hashing import canonical_json, sha256_file
from protocol.ops.atomic import write_bytes_atomic
from protocol.storage import StorageError

MANIFEST_NAME = "moesaic-manifest.json"
MANIFEST_MAX_BYTES = 16 << 20
MANIFEST_VERSION = 1
_SKIP_DIRS = {".cache", ".git", ".huggingface"}


@dataclass(frozen=True)
class HubCheckpoint:
    """What a publisher commits on chain to name a checkpoint on the Hub."""

    repo_id: str
    revision: str  # the commit sha returned by the upload: branches can move, commits cannot
    manifest_sha256: str

    @property
    def uri(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}"


def _files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files to publish (the manifest and tool caches excluded)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] not in _SKIP_DIRS and rel.as_posix() != MANIFEST_NAME:
            out.append(rel.as_posix())
    return out


def build_manifest(folder: str | Path) -> dict:
    """{"version": 1, "files": {path: {"sha256", "size"}}} for every file under folder."""
    folder = Path(folder)
    files = {
        rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
        for rel in _files(folder)
    }
    if not files:
        raise FileNotFoundError(f"no files to publish in {folder}")
    return {"version": MANIFEST_VERSION, "files": files}


def write_manifest(folder: str | Path) -> str:
    """Write the manifest into folder; returns the sha256 of its exact bytes."""
    data = canonical_json(build_manifest(folder))
    write_bytes_atomic(Path(folder) / MANIFEST_NAME, data)
    return hashlib.sha256(data).hexdigest()


def _check_path(rel: str) -> str:
    """A manifest path that cannot escape the checkpoint directory or act as a glob."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or any(c in rel for c in "\\*?[]"):
        raise ValueError(f"unsafe path in manifest: {rel!r}")
    return p.as_posix()


def parse_manifest(data: bytes, uri: str) -> dict[str, dict]:
    """The manifest's files, validated: safe paths, hex digests, non-negative sizes."""
    try:
        doc = json.loads(data)
        if doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, expected {MANIFEST_VERSION}")
        files = {
            _check_path(rel): {"sha256": str(e["sha256"]), "size": int(e["size"])}
            for rel, e in doc["files"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StorageError("bad_request", uri, f"invalid manifest: {e}") from e
    if any(e["size"] < 0 or len(e["sha256"]) != 64 for e in files.values()):
        raise StorageError("bad_request", uri, "invalid manifest: bad size or digest")
    return files


def publish_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    api=None,
    revision: str | None = None,
    commit_message: str = "moesaic checkpoint",
) -> HubCheckpoint:
    """Write the manifest and upload the folder in one commit."""
    if api is None:
        from huggingface_hub import HfApi  # noqa: PLC0415 (optional dependency: only needed when no api is passed)

        api = HfApi()
    manifest_sha256 = write_manifest(folder)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=[f"{d}/**" for d in sorted(_SKIP_DIRS)],
    )
    return HubCheckpoint(repo_id, info.oid, manifest_sha256)


def pull_checkpoint(ckpt: HubCheckpoint, dest: str | Path, *, max_bytes: int, api=None) -> Path:
    """Download a published checkpoint to dest (which must not exist), verified file by file."""
    if api is None:
        from huggingface_hub import HfApi  # noqa: PLC0415 (optional dependency: only needed when no api is passed)

        api = HfApi()
    dest = Path(dest)
    if dest.exists():
        raise ValueError(f"{dest} exists; remove it or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.pull-"))
    try:
        files = _fetch_manifest(api, ckpt, staging, max_bytes)
        api.snapshot_download(
            ckpt.repo_id,
            revision=ckpt.revision,
            local_dir=str(staging),
            allow_patterns=sorted(files),
        )
        _verify_tree(staging, files, ckpt.uri)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _fetch_manifest(api, ckpt: HubCheckpoint, staging: Path, max_bytes: int) -> dict[str, dict]:
    path = Path(
        api.hf_hub_download(
            ckpt.repo_id, MANIFEST_NAME, revision=ckpt.revision, local_dir=str(staging)
        )
    )
    if path.stat().st_size > MANIFEST_MAX_BYTES:
        raise StorageError("too_large", ckpt.uri, f"manifest over {MANIFEST_MAX_BYTES} bytes")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != ckpt.manifest_sha256:
        raise StorageError(
            "digest_mismatch",
            ckpt.uri,
            f"manifest sha256 {digest}, expected {ckpt.manifest_sha256}",
        )
    files = parse_manifest(data, ckpt.uri)
    total = sum(e["size"] for e in files.values())
    if total > max_bytes:
        raise StorageError(
            "too_large", ckpt.uri, f"checkpoint is {total} bytes, cap is {max_bytes}"
        )
    return files


def _verify_tree(staging: Path, files: dict[str, dict], uri: str) -> None:
    """Every listed file present with its size and sha256; anything else removed."""
    for rel, entry in files.items():
        p = staging / rel
        if not p.is_file():
            raise StorageError("missing", uri, f"{rel} listed in the manifest but not downloaded")
        if p.stat().st_size != entry["size"]:
            raise StorageError(
                "digest_mismatch",
                uri,
                f"{rel}: {p.stat().st_size} bytes, manifest says {entry['size']}",
            )
        if (digest := sha256_file(p)) != entry["sha256"]:
            raise StorageError(
                "digest_mismatch", uri, f"{rel}: sha256 {digest}, manifest says {entry['sha256']}"
            )
    keep = set(files) | {MANIFEST_NAME}
    for p in sorted(staging.rglob("*"), reverse=True):  # children before their directories
        rel = p.relative_to(staging).as_posix()
        if p.is_dir() and not p.is_symlink():
            if not any(k.startswith(rel + "/") for k in keep):
                shutil.rmtree(p)
        elif rel not in keep:
            p.unlink()
