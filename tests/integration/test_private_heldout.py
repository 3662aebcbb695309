"""Validator-private held-out data (issue 15): a validator with `heldout` set scores on its own
text, never on the packaged public test split; a missing, empty or too small source stops it at
start-up with the path named; without one its start-up log says the pool is public.

One round on a FakeLedger and a FileStore with the test-preset base: a real honest Miner
commits, a real Validator with private held-out text scores it. tests/integration/test_cheats.py
(test_evalpool_trainer_gains_nothing_under_private_heldout) measures what the setting is for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pytest
import torch
from test_validator_node import SETTINGS
from transformers import AutoTokenizer

from miner.node import Miner, TrainSettings
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.identity.keys import EthSigner
from protocol.moe.data import ALL, load_blocks, write_docs
from protocol.moe.evaluate import eval_seed
from protocol.round.context import RoleContext
from protocol.round.manifest import evm_chain
from protocol.round.schedule import Schedule
from protocol.round.scoring import OK
from protocol.storage.file import FileStore
from validator.node import Validator

ROUND, TASK = 1, 0
SCHEDULE = Schedule(train=4, commit=8, reveal=2, evaluate=2, weights=4, merge=2)
CHAIN = evm_chain(31337, "0x" + "33" * 20)
HASH = "0x" + "5a" * 32


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    """Private text for the validator: the math val split, which no miner here reads."""
    path = tmp_path_factory.mktemp("validator-private") / "math.jsonl"
    write_docs("corpus:math", "val", path)
    return f"jsonl:{path}"


def _ctx(ledger, store, base, assignment, who="validator-1") -> RoleContext:
    return RoleContext(
        FakeChain(ledger, who),
        store,
        schedule=SCHEDULE,
        chain_label=CHAIN,
        task_id=TASK,
        base_dir=base,
        assignment_path=assignment,
    )


def _validator(ctx: RoleContext, state_dir, heldout: str) -> Validator:
    return Validator(
        ctx,
        domain_spec="corpus:math",
        general_specs=["corpus:prose", "corpus:code"],
        state_dir=state_dir,
        settings=dataclasses.replace(SETTINGS, heldout=heldout),
    )


@pytest.fixture()
def make(tmp_path, test_base, test_assignment):
    ledger = FakeLedger(SCHEDULE)
    return lambda spec: _validator(_ctx(ledger, None, test_base, test_assignment), tmp_path, spec)


# ----------------------------------------------------------------------------- start-up


def test_missing_heldout_stops_the_validator_naming_the_path(make, tmp_path):
    gone = tmp_path / "no-such-dir"
    with pytest.raises(ValueError, match=f"held-out data text:{gone}: missing"):
        make(f"text:{gone}")


def test_empty_heldout_stops_the_validator_naming_the_path(make, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.bin").write_text("not a text suffix")
    with pytest.raises(ValueError, match=f"held-out data text:{tmp_path / 'empty'} is empty"):
        make(f"text:{tmp_path / 'empty'}")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=f"held-out data text:{tmp_path / 'blank.txt'} is empty"):
        make(f"text:{tmp_path / 'blank.txt'}")


def test_too_small_heldout_stops_the_validator_naming_the_path(make, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Problem: 1 + 1. Answer: 2.\n" * 200)  # a few dozen blocks, not 96
    e = SETTINGS.evaluation
    need = e.domain_batches * e.batch_size
    with pytest.raises(ValueError, match=rf"text:{small} is too small: \d+ blocks .* {need}"):
        make(f"text:{small}")


def test_heldout_equal_to_the_miners_data_is_refused(test_base, test_assignment, tmp_path):
    ctx = _ctx(FakeLedger(SCHEDULE), None, test_base, test_assignment)
    with pytest.raises(ValueError, match="is the task's data"):
        Validator(
            ctx,
            domain_spec="text:/srv/math",
            general_specs=["corpus:prose"],
            state_dir=tmp_path,
            settings=dataclasses.replace(SETTINGS, heldout="text:/srv/math"),
        )


def test_startup_log_says_where_scores_come_from(make, heldout, caplog):
    caplog.set_level(logging.INFO, logger="moesaic.validator")
    make("")
    public = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert public and "PUBLIC test split of corpus:math" in public[0].getMessage()
    assert "miners can train on it" in public[0].getMessage()
    caplog.clear()
    make(heldout)
    lines = [r.getMessage() for r in caplog.records]
    assert any("private to this validator" in m for m in lines), lines
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


# ----------------------------------------------------------------------------- the batches


def test_private_batches_come_from_the_heldout_text_only(make, heldout, test_base):
    tokenizer = AutoTokenizer.from_pretrained(test_base)
    private, public = make(heldout), make("")
    seed = eval_seed(HASH, ROUND, TASK)
    got = private.eval_set(tokenizer, seed)
    e = SETTINGS.evaluation
    held = load_blocks(heldout, ALL, tokenizer, e.seq_len, e.max_tokens)
    pool = load_blocks("corpus:math", "test", tokenizer, e.seq_len, e.max_tokens)
    rows = {tuple(r.tolist()) for r in held}
    public_rows = {tuple(r.tolist()) for r in pool}
    drawn = [tuple(r.tolist()) for b in got.domain for r in b]
    assert len(drawn) == e.domain_batches * e.batch_size
    assert all(r in rows for r in drawn)
    assert not any(r in public_rows for r in drawn)  # nothing of the public pool scores
    # Seeded as before: the same seed draws the same batches, another seed others.
    assert private.eval_set(tokenizer, seed).digest() == got.digest()
    assert private.eval_set(tokenizer, seed + 1).digest() != got.digest()
    assert public.eval_set(tokenizer, seed).digest() != got.digest()
    # The general guard is unchanged: the same public general batches either way.
    other = public.eval_set(tokenizer, seed)
    assert all(torch.equal(a, b) for a, b in zip(got.general, other.general, strict=True))


# ----------------------------------------------------------------------------- one round


def test_a_round_is_scored_on_private_heldout(tmp_path, test_base, test_assignment, heldout):
    ledger, store = FakeLedger(SCHEDULE), FileStore(tmp_path / "store")
    FakeChain(ledger, "owner").authorise_validator("validator-1")
    who = EthSigner("0x" + hashlib.sha256(b"heldout-test-miner").hexdigest())
    FakeChain(ledger, who.identity).register()
    miner_ctx = dataclasses.replace(
        _ctx(ledger, store, test_base, test_assignment, who.identity), signer=who
    )
    train = TrainSettings(steps=16, lr=1e-2, batch_size=4, seq_len=64, max_tokens=20_000)
    miner = Miner(
        miner_ctx,
        data_spec="corpus:math",
        work_dir=tmp_path / "miner",
        train=dataclasses.replace(train, device="cpu"),
        quiet=True,
    )
    miner.run_round(ROUND, wait=ledger.mine_to)
    validator = _validator(
        _ctx(ledger, store, test_base, test_assignment), tmp_path / "validator", heldout
    )
    state = validator.run_round(ROUND, wait=ledger.mine_to)
    record = state["evaluate"]
    assert record["heldout"] == "private"
    assert heldout.split(":", 1)[1] not in str(state)  # the private path stays out of records
    outcome = record["outcomes"][who.identity]
    assert outcome["code"] == OK and outcome["value"] > 0, outcome
    # An honest delta improves text it never saw: the private score is a real measurement.
    assert outcome["domain_lcb"] > 0
