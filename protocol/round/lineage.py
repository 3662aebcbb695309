"""Which checkpoint a round builds on, and a local cache of pulled, verified checkpoints.

    lineage = Lineage(chain, task_base="runs/base", cache_dir="runs/miner0/checkpoints")
    base_dir, base_hash = lineage.base_for(r)   # the task base, or the latest merged checkpoint

The rule every role applies (pure, `round_base`): round r builds on the checkpoint published
for the latest round before r, or on the task's base while none was published; the chain
answers it in one bounded read (`Chain.latest_checkpoint(before_round=r)`). The registry
accepts a round's checkpoint only in that round's merge phase, so once round r has started the
answer can no longer change: miners resolve it when round r starts (they wait for that block),
validators and the merger when they collect round r (after its commit deadline). All of them
therefore train, verify and evaluate against the same base without talking to each other.

Checkpoints are pulled with protocol.artifact.checkpoint.pull (digest checked against the chain, staged
and renamed into place), once per digest, into `cache_dir/<digest>`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from protocol.artifact.checkpoint import pull
from protocol.chain import Chain, Checkpoint
from protocol.identity.hashing import sha256_dir

log = logging.getLogger("moesaic.lineage")

DEFAULT_MAX_BYTES = 200 << 30  # a bf16 30B-parameter MoE is ~60 GB; a cap, not an estimate


def round_base(checkpoints: Sequence[Checkpoint], r: int) -> Checkpoint | None:
    """The checkpoint round r builds on: the one of the latest round before r, or None."""
    earlier = [c for c in checkpoints if c.round < r]
    return max(earlier, key=lambda c: (c.round, c.block)) if earlier else None


class Lineage:
    """Resolves and caches the base of each round for one role process."""

    def __init__(
        self,
        chain: Chain,
        *,
        task_base: str | Path,
        cache_dir: str | Path,
        store_options: Mapping[str, Any] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        task_base_hash: str | None = None,
    ):
        self.chain, self.task_base = chain, Path(task_base)
        self.cache_dir, self.max_bytes = Path(cache_dir), max_bytes
        self.store_options = dict(store_options or {})
        self.task_base_hash = task_base_hash or sha256_dir(self.task_base)

    def checkpoint_for(self, r: int) -> Checkpoint | None:
        """The chain's answer to `round_base` for round r."""
        return self.chain.latest_checkpoint(before_round=r)

    def base_for(self, r: int) -> tuple[Path, str]:
        """(local directory, digest) of round r's base, pulling the checkpoint if needed."""
        c = self.checkpoint_for(r)
        if c is None:
            return self.task_base, self.task_base_hash
        return self.local(c), c.digest

    def local(self, c: Checkpoint) -> Path:
        """The checkpoint's verified local copy (pulled once; a complete dir or none)."""
        dest = self.cache_dir / c.digest
        if dest.is_dir() and any(dest.iterdir()):
            return dest
        log.info("pulling checkpoint of round %d (%s) from %s", c.round, c.digest[:16], c.uri)
        return pull(c, dest, store_options=self.store_options, max_bytes=self.max_bytes)


def base_record(lineage: Lineage | None, r: int, default_dir: Path, default_hash: str) -> dict:
    """Round r's base as a role records it when it collects the round: {"dir", "digest"}."""
    if lineage is None:
        return {"dir": str(default_dir), "digest": default_hash}
    base_dir, digest = lineage.base_for(r)
    return {"dir": str(base_dir), "digest": digest}


def recorded_base(collected: dict, default_dir: Path, default_hash: str) -> tuple[Path, str]:
    """(dir, digest) of the base a collect record names; records written before lineage
    support name none and mean the role's own base_dir."""
    base = collected.get("base")
    return (Path(base["dir"]), base["digest"]) if base else (default_dir, default_hash)
