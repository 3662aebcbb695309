"""Test helper: a delta file re-declared for another miner's shard, as a test's miner submits it.

Tests that train a delta once (e.g. with `moesaic miner train`, a one-off job declaring
protocol.round.shards.UNSHARDED) and submit it under a hotkey of their choosing must make it
declare that hotkey's shard, or validators refuse it as `wrong_shard`. The wire tensors are
kept byte for byte; only the metadata's `shard` changes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from protocol.artifact.delta import METADATA_KEY, DeltaMeta, write_encoded
from protocol.round.shards import shard_key


def declaring_shard(path: Path, task_id: int, hotkey: str, out: Path | None = None) -> Path:
    """`path`'s delta declaring shard_key(task_id, hotkey, its round), written to `out`
    (default: next to it, named after the hotkey); the new file's path."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:  # trusted: the test wrote this file
        meta = DeltaMeta.from_json(f.metadata()[METADATA_KEY])
    meta = dataclasses.replace(meta, shard=shard_key(task_id, hotkey, meta.round))
    out = out or path.with_name(f"{path.stem}.{hotkey[-12:]}.safetensors")
    write_encoded(out, load_file(str(path)), meta)
    return out
