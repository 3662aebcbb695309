"""A validator's private held-out source, the pure parts: the `heldout` setting's shape, the ALL
pseudo-split, writing a split as jsonl, and the evalpool trainer's pool (issue 15)."""

import json

import pytest

from miner.settings import MinerConfig
from protocol.config import apply_overrides, build
from protocol.moe.data import ALL, docs_for_split, iter_docs, split_of, write_docs
from validator.settings import ValidatorConfig, ValidatorSettings


def test_heldout_defaults_to_the_public_pool_and_accepts_private_specs():
    assert ValidatorSettings().heldout == ""
    for spec in ("text:/srv/heldout/math", "jsonl:/srv/h.jsonl#body", "hf:/srv/ds"):
        assert ValidatorSettings(heldout=spec).heldout == spec


def test_heldout_refuses_a_packaged_corpus_because_it_is_public():
    with pytest.raises(ValueError, match="packaged corpus is public"):
        ValidatorSettings(heldout="corpus:math")


@pytest.mark.parametrize("bad", ["math.txt", "web:/x", "text:", "jsonl:#body", 3])
def test_heldout_refuses_a_malformed_spec_naming_it(bad):
    with pytest.raises(ValueError, match="heldout"):
        ValidatorSettings(heldout=bad)


def test_heldout_is_a_flat_validator_key_settable_from_the_command_line():
    data = apply_overrides({"validator": {}}, ['validator.heldout="text:/srv/heldout"'])
    config = build(ValidatorConfig, data["validator"], "validator")
    assert config.settings.heldout == "text:/srv/heldout"
    with pytest.raises(ValueError, match="packaged corpus is public"):
        build(ValidatorConfig, {"heldout": "corpus:code"}, "validator")


def test_all_is_every_document_of_a_spec_in_hash_order(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"id": f"d{i}", "group": f"g{i}", "text": f"doc {i}"} for i in range(50)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    every = docs_for_split(f"jsonl:{path}", ALL)
    assert sorted(d.id for d in every) == sorted(r["id"] for r in rows)
    by_split = [d for s in ("train", "val", "test") for d in docs_for_split(f"jsonl:{path}", s)]
    assert sorted(d.id for d in by_split) == sorted(d.id for d in every)
    with pytest.raises(ValueError, match="unknown split"):
        docs_for_split(f"jsonl:{path}", "everything")


def test_write_docs_carves_one_split_readable_as_jsonl(tmp_path):
    src = tmp_path / "src.jsonl"
    rows = [{"id": f"d{i}", "group": f"g{i % 40}", "text": f"text {i}"} for i in range(400)]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "validator" / "heldout" / "val.jsonl"
    n = write_docs(f"jsonl:{src}", "val", out)
    carved = list(iter_docs(f"jsonl:{out}"))
    assert n == len(carved) > 0
    assert all(split_of(d) == "val" for d in carved)  # groups kept: still the val split
    assert [d.id for d in carved] == [d.id for d in docs_for_split(f"jsonl:{src}", "val")]


def test_the_evalpool_trainer_is_a_strategy_a_config_accepts():
    from miner.strategies import EVALPOOL_SPLITS, STRATEGIES

    assert MinerConfig(strategy="evalpool").strategy == "evalpool"
    assert "evalpool" in STRATEGIES
    assert EVALPOOL_SPLITS[0] == "test"  # the old public evaluation pool comes first
