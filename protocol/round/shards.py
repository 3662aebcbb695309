"""Which part of a task's training data a miner trains on in a round: its shard.

A shard is a keyed order of the domain's train split (protocol.moe.data, `order_key`): the
documents sorted by sha256(key, document id), read from the front up to the miner's token
budget. The key is derived from the task, the miner's hotkey and the round, so

- every miner and every round reads a different, effectively random sample of the split (two
  budgets of b tokens out of a split of S overlap by about b/S of their documents: a few in a
  thousand for the devnet's budgets on the math split), and the network as a whole sees N times
  the text one miner sees, instead of N copies of the same first tokens;
- anyone who knows the task, the hotkey and the round recomputes the key: a delta declares the
  key it was trained on (protocol.artifact.delta.DeltaMeta.shard) and validators refuse one that
  names another shard (`wrong_shard`), so a miner cannot claim the same shard every round.

What a miner actually trained on cannot be proven from a delta; the key makes the honest rule
checkable and cheating it unprofitable to hide (docs/network.md). Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib

from protocol.identity.keys import normalise

SHARD_KEY_VERSION = 1
# What a delta made outside a round (a one-off `moesaic miner train` job, a benchmark) declares:
# the train split in its plain order. No (task, hotkey, round) hashes to it, so a validator
# refuses it in any round (`wrong_shard`).
UNSHARDED = "0" * 64


def shard_key(task_id: int, hotkey: str, round: int) -> str:
    """The hex sha256 naming (task, hotkey, round)'s shard; hotkeys compare as the chain does
    (EVM addresses case-insensitively)."""
    for name, value in (("task_id", task_id), ("round", round)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(hotkey, str) or not hotkey.strip():
        raise ValueError(f"hotkey must be a non-empty string, got {hotkey!r}")
    text = f"moesaic-shard:v{SHARD_KEY_VERSION}:{task_id}:{normalise(hotkey)}:{round}"
    return hashlib.sha256(text.encode()).hexdigest()
