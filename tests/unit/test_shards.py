"""The shard rule (protocol.round.shards): distinct per miner and round, reproducible, and a
keyed order of the train split whose budgets barely overlap."""

from __future__ import annotations

import pytest

from protocol.moe.data import docs_for_split
from protocol.round.shards import shard_key

A = "0x3Be0d05C1e42E4Fc220C2c19e81D68BB4e174c6b"
B = "0xCdf6b86739F1518c8897b78ABB9Ad31cada58Edc"


def test_shard_key_is_reproducible_and_distinct():
    assert shard_key(0, A, 3) == shard_key(0, A, 3)
    assert shard_key(0, A, 3) == shard_key(0, A.lower(), 3)  # the chain's comparison
    keys = {shard_key(t, h, r) for t in (0, 1) for h in (A, B) for r in range(8)}
    assert len(keys) == 2 * 2 * 8


@pytest.mark.parametrize("bad", [(-1, A, 0), (0, A, -1), (0, "", 0), (True, A, 0), (0, A, 1.5)])
def test_shard_key_refuses_bad_input(bad):
    with pytest.raises(ValueError):
        shard_key(*bad)


def test_keyed_orders_sample_different_documents():
    plain = docs_for_split("corpus:math", "train")
    assert [d.id for d in docs_for_split("corpus:math", "train", "")] == [d.id for d in plain]
    firsts = []
    for h in (A, B):
        for r in range(3):
            docs = docs_for_split("corpus:math", "train", shard_key(0, h, r))
            assert sorted(d.id for d in docs) == sorted(d.id for d in plain)  # a permutation
            firsts.append({d.id for d in docs[:200]})
    for i, x in enumerate(firsts):
        for y in firsts[i + 1 :]:
            assert len(x & y) < 20, "two shards' first 200 documents overlap by 10 % or more"
