"""A colluding validator beside two honest ones, through real validators and the real merger.

.venv/bin/python -m pytest -q tests/integration/test_dishonest_validators.py

Two honest miners and one lazy one (noise) commit on a fake chain with a file store. Three
validators score the round; one of them (strategy "colluding", validator.strategies) sets all
its weight to the lazy miner. The merger combines the weights (protocol.round.consensus): the
lazy miner's consensus weight is 0 and nothing of it is merged, where the plain mean of the
weights would have given it a third; the colluder's standing drops, and keeps dropping the next
round, carried in the merger's round records across a restart.
"""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
from test_merger_node import _merger
from test_validator_node import (  # the validator test's miners and settings, not its fixtures
    CHAIN,
    ROUND,
    SCHEDULE,
    SETTINGS,
    TASK,
    _noise,
    _submit,
    signer,
)

from merger.node import MERGED
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.round.consensus import normalised
from protocol.round.context import RoleContext
from protocol.round.schedule import phase_bounds
from protocol.storage.file import FileStore
from validator.node import Validator
from validator.strategies import COLLUDING

HONEST_VALIDATORS = ("validator-1", "validator-2")
COLLUDER = "validator-colluding"
ALPHA = 0.3  # MergerSettings.standing_alpha's default


def _validator(ledger, store, ctx, name, state_dir, **strategy):
    role_ctx = RoleContext(
        FakeChain(ledger, name),
        store,
        schedule=SCHEDULE,
        chain_label=CHAIN,
        task_id=TASK,
        base_dir=ctx.base,
        assignment_path=ctx.assignment_path,
    )
    return Validator(
        role_ctx,
        domain_spec="corpus:math",
        general_specs=["corpus:prose", "corpus:code"],
        state_dir=state_dir,
        settings=dataclasses.replace(SETTINGS, **strategy),
    )


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, test_base, test_assignment, train_honest):
    work = tmp_path_factory.mktemp("dishonest_validators")
    return SimpleNamespace(
        work=work, base=test_base, assignment_path=test_assignment,
        honest=train_honest(work, ROUND),
    )  # fmt: skip


@pytest.fixture(scope="module")
def network(ctx):
    """ROUND scored by two honest validators and a colluding one; the chain at its merge phase.

    The three evaluate alike (the colluder's measurement is a copy of validator-1's, as is
    validator-2's: one evaluation on two cores); only what they set differs.
    """
    work, ledger = ctx.work, FakeLedger(SCHEDULE)
    store = FileStore(work / "store")
    owner = FakeChain(ledger, "owner")
    for v in (*HONEST_VALIDATORS, COLLUDER):
        owner.authorise_validator(v)
    owner.set_merger("merger")
    keys = {name: signer(name).identity for name in ("alice", "bob", "carol")}
    for identity in keys.values():
        FakeChain(ledger, identity).register()
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "commit")[0] - 1)
    artifacts = {
        "alice": ctx.honest[0],
        "bob": ctx.honest[1],
        "carol": _noise(work, "carol", ctx.honest[0], seed=1234),  # the lazy miner
    }
    for name, path in artifacts.items():
        _submit(ledger, store, work, name, path)
    first = _validator(ledger, store, ctx, HONEST_VALIDATORS[0], work / "v1")
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "evaluate")[0])
    for step in (first.collect, first.fetch, first.evaluate):
        step(ROUND)
    shutil.copytree(work / "v1", work / "v2")
    shutil.copytree(work / "v1", work / "vc")
    validators = {
        HONEST_VALIDATORS[0]: first,
        HONEST_VALIDATORS[1]: _validator(ledger, store, ctx, HONEST_VALIDATORS[1], work / "v2"),
        COLLUDER: _validator(
            ledger, store, ctx, COLLUDER, work / "vc", strategy=COLLUDING,
            collude_with=keys["carol"],
        ),
    }  # fmt: skip
    _run_validators(validators.values(), ROUND, ledger)
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "merge")[0])
    uid = {m.hotkey: m.uid for m in owner.members()}
    return SimpleNamespace(ledger=ledger, store=store, keys=keys, uid=uid, validators=validators)


def _run_validators(validators, r: int, ledger) -> None:
    """Round r for every validator: all commit their weights in the evaluate phase, then each
    finishes its round (the reveal); one validator's whole round would leave the others' commits
    past the evaluate phase."""
    ledger.mine_to(phase_bounds(SCHEDULE, r, "evaluate")[0])
    for v in validators:
        for step in (v.collect, v.fetch, v.evaluate, v.score, v.weights_salt, v.commit_weights):
            step(r)
    for v in validators:
        v.run_round(r, wait=ledger.mine_to)


@pytest.fixture(scope="module")
def merged(ctx, network):
    merger = _merger(ctx, network, ctx.work / "merger")
    return SimpleNamespace(merger=merger, record=merger.run_round(ROUND, network.ledger.mine_to))


def test_the_colluding_validator_really_set_all_its_weight_on_the_lazy_miner(network):
    """The attack happened on chain, and the plain mean would have paid it a third."""
    on_chain, uid = network.ledger.weights[ROUND], network.uid
    carol = uid[network.keys["carol"]]
    assert on_chain[uid[COLLUDER]] == {carol: 65535}
    for v in HONEST_VALIDATORS:
        assert carol not in on_chain[uid[v]] and on_chain[uid[v]]  # the honest gave it nothing
    plain_mean = sum(normalised(w).get(carol, 0.0) for w in on_chain.values()) / len(on_chain)
    assert plain_mean == pytest.approx(1 / 3)


def test_a_colluding_validator_gets_its_miner_nothing_merged(network, merged):
    collect, merge, k, uid = (
        merged.record["collect"],
        merged.record["merge"],
        network.keys,
        network.uid,
    )
    print({u: round(w, 4) for u, w in collect["consensus"].items()}, merge["decision"])
    assert str(uid[k["carol"]]) not in collect["consensus"]  # consensus weight 0
    assert {a["hotkey"] for a in collect["accepted"]} == {k["alice"], k["bob"]}
    assert sum(collect["consensus"].values()) == pytest.approx(1.0)
    assert k["carol"] not in {h for h, _, _ in merge["included"]}
    assert k["carol"] not in merged.record["fetch"]["fetched"]
    assert merge["included"], merge["reason"]  # the honest work was merged
    if merge["decision"] == MERGED:
        assert len(merge["included"]) == 2


def test_a_colluding_validators_standing_drops(merged):
    validators = merged.record["collect"]["validators"]
    print({r["hotkey"]: (r["agreement"], r["standing_after"]) for r in validators.values()})
    colluder = validators[COLLUDER]
    assert colluder["voted"] and colluder["agreement"] == 0.0
    assert colluder["standing"] == 1.0 and colluder["standing_after"] == pytest.approx(1 - ALPHA)
    for v in HONEST_VALIDATORS:
        assert validators[v]["agreement"] == pytest.approx(1.0)
        assert validators[v]["standing_after"] == pytest.approx(1.0)
    assert merged.record["collect"]["standing"][COLLUDER] == pytest.approx(1 - ALPHA)


def test_standing_is_carried_to_the_next_round_across_a_merger_restart(ctx, network, merged):
    """Round ROUND + 1 has no submissions; the validators set weights from their averages
    (the colluder again on the lazy miner). A new merger instance on the same state carries
    the colluder's standing down once more, and collecting the round again does not."""
    ledger, nxt = network.ledger, ROUND + 1
    _run_validators(network.validators.values(), nxt, ledger)
    ledger.mine_to(phase_bounds(SCHEDULE, nxt, "merge")[0])
    restarted = _merger(ctx, network, ctx.work / "merger")
    collected = restarted.collect(nxt)
    validators = collected["validators"]
    assert validators[COLLUDER]["standing"] == pytest.approx(1 - ALPHA)
    assert validators[COLLUDER]["standing_after"] == pytest.approx((1 - ALPHA) ** 2)
    assert all(validators[v]["standing_after"] == pytest.approx(1.0) for v in HONEST_VALIDATORS)
    assert _merger(ctx, network, ctx.work / "merger").collect(nxt) == collected
