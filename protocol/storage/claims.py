"""Who holds each blob-server object, and how much each uploader holds: ownership and quotas.

Objects are content-addressed, so two identities can upload the same bytes. Each upload is a
*claim* by its signer; an object's bytes stay while any claim on them remains:

- PUT by X (new bytes, or bytes already stored) adds X's claim; X's quota is charged the
  object's full size and one object, whoever else also holds it;
- DELETE by X removes only X's claim (403 if X holds none); the bytes go with the last claim.

Why not "the first uploader owns it" or "any claimant may delete": where the bytes can be
predicted or copied (a public checkpoint shard, a rival's delta read back from the store), an
attacker could upload them first and then delete them from under the real author, or upload
them second and delete them. With claims, removing one's own claim never removes a rival's.
Objects found on disk without a record (written before claims existed) get the LEGACY holder,
which no signer can be, so they are append-only.

On disk: ROOT/claims/<sha[:2]>/<sha>.json = {"size": N, "holders": [identity, ...]}, written
atomically (protocol.ops.atomic). A claim is recorded before its object is installed and
removed after the object is unlinked, so a crash leaves at most a claim without an object,
which `ClaimBook.open` drops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from protocol.identity.keys import normalise
from protocol.ops.atomic import write_text_atomic

LEGACY = "<legacy>"  # holder of objects stored before claims were recorded; never a signer


@dataclass(frozen=True)
class Quota:
    """Per-identity limits: bytes and objects held (each claim counts its object's full size)."""

    max_bytes: int
    max_objects: int

    def __post_init__(self):
        for name in ("max_bytes", "max_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"quota {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Usage:
    """What one identity holds (or has in flight): bytes and objects."""

    bytes: int = 0
    objects: int = 0

    def plus(self, size: int, objects: int = 1) -> Usage:
        return Usage(self.bytes + size, self.objects + objects)


def over_quota(usage: Usage, size: int, quota: Quota) -> str | None:
    """Why one more object of `size` bytes would break `quota`, or None if it fits."""
    if usage.objects + 1 > quota.max_objects:
        return f"holds {usage.objects} objects, the quota is {quota.max_objects}"
    if usage.bytes + size > quota.max_bytes:
        return f"holds {usage.bytes} bytes; {size} more would pass the quota of {quota.max_bytes}"
    return None


class ClaimBook:
    """The claims of one server root, in memory and on disk (one small JSON file per object)."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "claims"
        self._holders: dict[str, tuple[int, set[str]]] = {}  # sha -> (size, holders)
        self._usage: dict[str, Usage] = {}

    @classmethod
    def open(cls, root: str | Path, stored: dict[str, int]) -> ClaimBook:
        """Load the claims, reconciled with `stored` (sha -> size of each object on disk):
        claims without an object are dropped, objects without claims become LEGACY's."""
        book = cls(root)
        book.dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(book.dir.glob("*/*.json")):
            sha = path.stem
            if sha not in stored:  # recorded, then the server died before installing it
                path.unlink(missing_ok=True)
                continue
            holders = set(json.loads(path.read_text())["holders"])
            book._set(sha, stored[sha], holders)
        for sha, size in stored.items():
            if sha not in book._holders:
                book._write(sha, size, {LEGACY})
                book._set(sha, size, {LEGACY})
        return book

    # -- queries ----------------------------------------------------------------------------
    def holders(self, sha: str) -> set[str]:
        return set(self._holders.get(sha, (0, set()))[1])

    def holds(self, sha: str, identity: str) -> bool:
        return normalise(identity) in self._holders.get(sha, (0, set()))[1]

    def usage(self, identity: str) -> Usage:
        return self._usage.get(normalise(identity), Usage())

    # -- changes (the caller serialises them) ------------------------------------------------
    def add(self, sha: str, size: int, identity: str) -> None:
        """Record identity's claim (persisted before returning); a no-op if it holds one."""
        key = normalise(identity)
        holders = self.holders(sha)
        if key in holders:
            return
        holders.add(key)
        self._write(sha, size, holders)
        self._set(sha, size, holders)

    def remove(self, sha: str, identity: str) -> int:
        """Drop identity's claim and persist it; returns how many claims remain. With none
        left the caller deletes the object, then calls `forget`."""
        key = normalise(identity)
        size, holders = self._holders[sha]
        holders = holders - {key}
        self._charge(key, -size, -1)
        self._holders[sha] = (size, holders)
        if holders:
            self._write(sha, size, holders)
        return len(holders)

    def forget(self, sha: str) -> None:
        """Remove the record of an object whose bytes are gone."""
        self._holders.pop(sha, None)
        self._path(sha).unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------------
    def _path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.json"

    def _write(self, sha: str, size: int, holders: set[str]) -> None:
        write_text_atomic(self._path(sha), json.dumps({"size": size, "holders": sorted(holders)}))

    def _set(self, sha: str, size: int, holders: set[str]) -> None:
        old_size, old = self._holders.get(sha, (size, set()))
        for h in old - holders:
            self._charge(h, -old_size, -1)
        for h in holders - old:
            self._charge(h, size, 1)
        self._holders[sha] = (size, holders)

    def _charge(self, key: str, size: int, objects: int) -> None:
        if key == LEGACY:
            return
        self._usage[key] = self.usage(key).plus(size, objects)
