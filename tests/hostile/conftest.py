"""The hostile tests' shared world: one valid delta of the random MoE and the reader's context."""

from __future__ import annotations

import hashlib

import pytest

from protocol.identity.keys import EthSigner
from protocol.round.shards import shard_key

from .corpus import make_valid

ROUND = 3  # the round the valid delta claims; every hostile test reads it under this round
MINER_KEY = "0x" + hashlib.sha256(b"hostile-miner").hexdigest()  # the valid delta's miner
# The shard the valid delta declares: its miner's of task 0, ROUND (protocol.round.shards).
SHARD = shard_key(0, EthSigner(MINER_KEY).identity, ROUND)


@pytest.fixture(scope="module")
def world(tmp_path_factory, random_moe_dir, random_assignment):
    """The valid delta, the files `moesaic artifact verify` needs, and the reader's context."""
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.model import expert_layout, load_model

    root = tmp_path_factory.mktemp("hostile")
    assignment_path = root / "assignment.json"
    random_assignment.save(assignment_path)
    valid = make_valid(
        random_moe_dir, random_assignment, root / "valid.safetensors", round=ROUND, shard=SHARD
    )
    model = load_model(random_moe_dir)
    return dict(
        root=root,
        valid=valid,
        base=random_moe_dir,
        model=model,
        base_hash=sha256_dir(random_moe_dir),
        assignment=random_assignment,
        assignment_path=assignment_path,
        layout=expert_layout(model),
    )
