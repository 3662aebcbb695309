"""The validator's round on a fake chain and a file store, with real trained deltas.

.venv/bin/python -m pytest -q tests/integration/test_validator_node.py

Six miners commit signed manifests for one round, in this order: two honest (trained with
`moesaic miner train`), one lazy (noise), one copycat (the first honest delta's tensors
declaring its own shard, under its own manifest), one whose artifact object is not in the store when validators
fetch (after the reveal phase), one whose committed digest names no manifest object: both
`not_revealed`. Three validators on one ledger: one runs the round
uninterrupted, one is killed after evaluate and restarted as a new instance, one is killed
right after its weights transaction; all three must end with the same weights on chain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from shard_files import declaring_shard

from moesaic.cli import main
from protocol.artifact.delta import METADATA_KEY, DeltaMeta, write_delta
from protocol.chain import Commitment, u16_weights
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.config import build
from protocol.identity.keys import EthSigner
from protocol.round.context import RoleContext
from protocol.round.manifest import evm_chain, manifest_for, sign
from protocol.round.schedule import Schedule, commit_deadline, phase_bounds
from protocol.round.scoring import DUPLICATE, NO_IMPROVEMENT, OK, seeded_tiebreak
from protocol.settings import EvalSettings
from protocol.storage.file import FileStore
from validator.explain import format_explain
from validator.node import NOT_REVEALED, RoundError, Validator, ValidatorSettings

ROUND, TASK = 1, 0
# Four evaluate blocks: three validators each commit their weights there (one block per tx).
SCHEDULE = Schedule(train=4, commit=8, reveal=2, evaluate=4, weights=4, merge=2)
DEADLINE = commit_deadline(SCHEDULE, ROUND)
WEIGHTS = phase_bounds(SCHEDULE, ROUND, "weights")
CHAIN = evm_chain(31337, "0x" + "11" * 20)
MINERS = ("alice", "bob", "carol", "dave", "erin", "frank")  # commit order
# As in test_validator_evaluate.py: honest deltas forget ~0.005-0.02 nats of general loss.
SETTINGS = ValidatorSettings(
    evaluation=EvalSettings(
        domain_batches=24,
        general_batches=24,
        seq_len=64,
        batch_size=4,
        max_tokens=20_000,
        general_tolerance=0.05,
        max_artifact_bytes=8 << 20,
    ),
    ema_alpha=0.5,
)


class Killed(BaseException):
    """The process died (not an error any step may catch)."""


class DiesAfterSending:
    """A chain client whose process is killed right after its weights transaction is sent."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set_weights(self, *args):
        self.inner.set_weights(*args)
        raise Killed


def signer(name: str) -> EthSigner:
    return EthSigner("0x" + hashlib.sha256(f"validator-node-test-{name}".encode()).hexdigest())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("validator_node")


@pytest.fixture(scope="module")
def base(test_base):
    return test_base


@pytest.fixture(scope="module")
def assignment_path(test_assignment):
    return test_assignment


@pytest.fixture(scope="module")
def honest(work, train_honest):
    """Two honest deltas for ROUND: same recipe, different data order (seed)."""
    return train_honest(work, ROUND)


def _read(path):
    """(meta, tensors) of a delta we wrote ourselves (trusted: the test is the miner)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = DeltaMeta.from_json(f.metadata()[METADATA_KEY])
    return meta, load_file(str(path))


def _noise(work, name, like, seed):
    """A delta of gaussian noise with `like`'s per-tensor spread and metadata: no training."""
    meta, tensors = _read(like)
    g = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(v.shape, generator=g) * v.std() for k, v in tensors.items()}
    path = work / f"{name}.safetensors"
    write_delta(path, noise, meta)
    return path


def _submit(ledger, store, work, name, delta_path) -> str:
    """What a miner does: upload the delta (declaring this miner's shard), sign its manifest,
    upload that, commit its digest."""
    key = signer(name)
    delta_path = declaring_shard(delta_path, TASK, key.identity, work / f"{name}.delta.safetensors")
    ref = store.put(delta_path, name=f"{name}.safetensors")
    manifest = manifest_for(
        _read(delta_path)[0], ref, chain=CHAIN, task_id=TASK, hotkey=key.identity
    )
    signed = sign(manifest, key)
    (work / f"{name}.manifest.json").write_text(signed.to_json())
    store.put(work / f"{name}.manifest.json")
    FakeChain(ledger, key.identity).commit(ROUND, signed.commitment_digest())
    return ref.sha256


def _validator(ledger, store, ctx, name, state_dir, chain=None):
    role_ctx = RoleContext(
        chain or FakeChain(ledger, name),
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
        settings=SETTINGS,
    )


@pytest.fixture(scope="module")
def ctx(work, base, assignment_path, honest):
    return SimpleNamespace(work=work, base=base, assignment_path=assignment_path, honest=honest)


@pytest.fixture(scope="module")
def network(ctx):
    """The ledger after one round, three validators' states and what each miner committed."""
    work = ctx.work
    ledger = FakeLedger(SCHEDULE)
    store = FileStore(work / "store")
    owner = FakeChain(ledger, "owner")
    for v in ("validator-1", "validator-2", "validator-3"):
        owner.authorise_validator(v)
    keys = {name: signer(name).identity for name in MINERS}
    for identity in keys.values():
        FakeChain(ledger, identity).register()
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "commit")[0] - 1)
    artifacts = {
        "alice": ctx.honest[0],
        "bob": ctx.honest[1],
        "carol": _noise(work, "carol", ctx.honest[0], seed=1234),
        "dave": ctx.honest[0],  # alice's delta (declaring dave's shard), committed later
        "erin": _noise(work, "erin", ctx.honest[1], seed=99),
    }
    shas = {name: _submit(ledger, store, work, name, path) for name, path in artifacts.items()}
    store.delete(shas["erin"])  # uploaded, committed, then gone before validators fetch it
    FakeChain(ledger, keys["frank"]).commit(ROUND, hashlib.sha256(b"no manifest").hexdigest())

    # 2: killed after evaluate; a new process on the same state finishes the round.
    ledger.mine_to(DEADLINE + 1)
    first = _validator(ledger, store, ctx, "validator-2", work / "v2")
    first.collect(ROUND)
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "evaluate")[0])  # miners reveal until then
    first.fetch(ROUND)
    first.evaluate(ROUND)
    restarted = _validator(ledger, store, ctx, "validator-2", work / "v2")
    restarted.score(ROUND)
    shutil.copytree(work / "v2", work / "v3")  # validator 3 starts from the same scored state
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "evaluate")[0] - 1)
    restarted.weights_salt(ROUND)
    restarted.commit_weights(ROUND)
    v3_first = _validator(ledger, store, ctx, "validator-3", work / "v3")
    v3_first.weights_salt(ROUND)
    v3_first.commit_weights(ROUND)

    # 1: uninterrupted, waiting by mining (a daemon would poll); it commits last.
    v1 = _validator(ledger, store, ctx, "validator-1", work / "v1")
    v1.run_round(ROUND, wait=ledger.mine_to)
    restarted.set_weights(ROUND)

    # 3: killed right after its weights transaction was sent, before recording it.
    dying = DiesAfterSending(FakeChain(ledger, "validator-3"))
    with pytest.raises(Killed):
        _validator(ledger, store, ctx, "validator-3", work / "v3", chain=dying).set_weights(ROUND)
    v3_before_restart = json.loads((work / "v3" / "rounds" / f"{ROUND}.json").read_text())
    v3 = _validator(ledger, store, ctx, "validator-3", work / "v3")
    v3_result = v3.set_weights(ROUND)
    return SimpleNamespace(
        ledger=ledger,
        store=store,
        keys=keys,
        validators={"v1": v1, "v2": restarted, "v3": v3},
        v3_before_restart=v3_before_restart,
        v3_result=v3_result,
    )


def _state(validator) -> dict:
    return json.loads((validator.state_dir / "rounds" / f"{ROUND}.json").read_text())


# ----------------------------------------------------------------------------- the round


def test_every_committer_gets_its_outcome(network):
    state = _state(network.validators["v1"])
    outcomes = state["evaluate"]["outcomes"]
    k = network.keys
    for name, o in outcomes.items():
        print(f"{name}: {o['value']:.5f} {o['code']} {o['reason']}")
    assert sorted(outcomes) == sorted(k.values())
    for name in ("alice", "bob"):
        assert outcomes[k[name]]["code"] == OK and outcomes[k[name]]["value"] > 0
    assert outcomes[k["carol"]]["code"] == NO_IMPROVEMENT
    assert outcomes[k["dave"]]["code"] == DUPLICATE
    assert outcomes[k["dave"]]["duplicate_of"] == k["alice"]
    erin, frank = outcomes[k["erin"]], outcomes[k["frank"]]
    assert (erin["code"], erin["rejection"]) == (NOT_REVEALED, "missing")
    assert erin["reason"].startswith("artifact not revealed")
    assert (frank["code"], frank["rejection"]) == (NOT_REVEALED, "missing")
    assert frank["reason"].startswith("manifest not revealed")
    for name in ("carol", "dave", "erin", "frank"):
        assert outcomes[k[name]]["value"] == 0.0
    fetched = state["fetch"]["fetched"]
    assert sorted(fetched) == sorted(k[n] for n in ("alice", "bob", "carol", "dave"))
    # dave's file is alice's tensors under dave's shard: other bytes, the same delta.
    assert fetched[k["dave"]]["artifact_sha256"] != fetched[k["alice"]]["artifact_sha256"]
    # Every valid delta's sketch is kept for the next rounds' copy detection, under this
    # validator's own secret.
    from protocol.artifact.sketch import key_id, load_sketches

    v = network.validators["v1"]
    sketches = load_sketches(v.state_dir / "sketches" / f"{ROUND}.safetensors")
    assert sorted(sketches) == sorted(fetched)
    secret = (v.state_dir / "sketch.secret").read_bytes()
    assert {s.key_id for s in sketches.values()} == {key_id(secret)}


def test_only_honest_miners_get_weight_and_the_chain_holds_it(network):
    v1 = network.validators["v1"]
    state, k = _state(v1), network.keys
    uid = state["score"]["uids"]
    weights = dict(zip(*state["score"]["weights"].values(), strict=True))
    print("weights", {name: weights.get(uid[k[name]], 0.0) for name in MINERS})
    assert set(weights) == {uid[k["alice"]], uid[k["bob"]]}
    assert sum(weights.values()) == pytest.approx(1.0)
    # ema_alpha 0.5 and no earlier round: the average is half this round's score.
    for name in ("alice", "bob"):
        value = state["evaluate"]["outcomes"][k[name]]["value"]
        assert state["score"]["averages"][k[name]] == pytest.approx(0.5 * value)
    on_chain = network.ledger.weights[ROUND][uid["validator-1"]]
    assert on_chain == dict(zip(*u16_weights(list(weights), list(weights.values())), strict=True))
    assert state["set_weights"]["status"] == "sent"
    assert WEIGHTS[0] == state["set_weights"]["block"]
    assert state["set_weights"]["on_chain"] == {str(u): w for u, w in on_chain.items()}


def test_restarted_validator_ends_with_identical_weights(network):
    s1, s2 = _state(network.validators["v1"]), _state(network.validators["v2"])
    for step in ("collect", "fetch", "evaluate", "score"):
        assert s1[step] == s2[step], step
    by_validator = network.ledger.weights[ROUND]
    uid = s1["score"]["uids"]
    assert by_validator[uid["validator-2"]] == by_validator[uid["validator-1"]]
    assert s2["set_weights"]["status"] == "sent"


def test_weights_are_committed_with_a_recorded_salt_before_they_are_revealed(network):
    """Each validator committed a hash in the evaluate phase with its own salt, recorded in
    the round's state, and revealed with that salt (the reveal matched: it landed)."""
    salts = set()
    for name in ("v1", "v2", "v3"):
        state = _state(network.validators[name])
        lo, hi = phase_bounds(SCHEDULE, ROUND, "evaluate")
        assert state["commit_weights"]["status"] == "sent"
        assert lo <= state["commit_weights"]["block"] <= hi
        salts.add(state["weights_salt"]["salt"])
    assert len(salts) == 3  # drawn per validator: nobody can precompute another's hash
    held = network.ledger.weight_commitments[ROUND]
    assert sorted(held) == ["validator-1", "validator-2", "validator-3"]


def test_killed_after_sending_is_recorded_not_resent(network):
    assert "set_weights" not in network.v3_before_restart  # died before recording
    assert network.v3_result["status"] == "already_on_chain"
    by_validator = network.ledger.weights[ROUND]
    uid = _state(network.validators["v1"])["score"]["uids"]
    assert by_validator[uid["validator-3"]] == by_validator[uid["validator-1"]]
    # Asking again is answered from the state, not the chain.
    assert network.validators["v3"].set_weights(ROUND) == network.v3_result


def test_fetch_waits_until_the_reveal_phase_is_over(ctx, tmp_path):
    """Collecting is allowed past the deadline, fetching only from the first evaluate block:
    miners upload in the reveal phase, and an early fetch would score them not_revealed."""
    ledger = FakeLedger(SCHEDULE)
    v = _validator(ledger, FileStore(tmp_path / "s"), ctx, "validator-1", tmp_path / "v")
    ledger.mine_to(DEADLINE + 1)
    v.collect(ROUND)
    evaluate_first = phase_bounds(SCHEDULE, ROUND, "evaluate")[0]
    ledger.mine_to(evaluate_first - 1)
    with pytest.raises(RoundError, match=f"miners reveal until block {evaluate_first}"):
        v.fetch(ROUND)
    ledger.mine_to(evaluate_first)
    assert v.fetch(ROUND) == {"fetched": {}, "rejected": {}}


def test_killed_mid_fetch_the_restart_records_the_same_fetch(network, ctx, tmp_path):
    class DiesOnThirdGet:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def get(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:  # alice's manifest and artifact are in, bob's manifest is not
                raise Killed
            return self.inner.get(*args, **kwargs)

    ledger, store = network.ledger, network.store
    dying = _validator(ledger, DiesOnThirdGet(store), ctx, "validator-1", tmp_path / "v")
    dying.collect(ROUND)
    with pytest.raises(Killed):
        dying.fetch(ROUND)
    assert "fetch" not in _state(dying)
    restarted = _validator(ledger, store, ctx, "validator-1", tmp_path / "v")
    assert restarted.fetch(ROUND) == _state(network.validators["v1"])["fetch"]


def test_explain_rows_carry_codes_and_reasons(network):
    rows = {r.hotkey: r for r in network.validators["v1"].explain(ROUND)}
    k = network.keys
    table = format_explain(list(rows.values()))
    print(table)
    assert rows[k["alice"]].weight > 0 and rows[k["alice"]].code == OK
    assert "corpus:math: loss improvement" in rows[k["alice"]].reason
    assert (rows[k["carol"]].weight, rows[k["carol"]].code) == (0.0, NO_IMPROVEMENT)
    assert "duplicate of " + k["alice"] in rows[k["dave"]].reason
    assert rows[k["erin"]].code == NOT_REVEALED and "no such object" in rows[k["erin"]].reason
    assert rows[k["frank"]].code == NOT_REVEALED and "manifest" in rows[k["frank"]].reason
    assert rows["validator-1"].code == "no_submission"
    assert table.splitlines()[0].split()[:7] == [
        "uid",
        "hotkey",
        "score",
        "average",
        "weight",
        "code",
        "reason",
    ]
    assert all(k[name] in table for name in MINERS)


def test_next_round_decays_the_moving_average(network, ctx, tmp_path):
    """score(r + 1) starts from round r's averages: with no submission they decay by 1 - alpha."""
    shutil.copytree(network.validators["v1"].state_dir, tmp_path / "v")
    v = _validator(network.ledger, network.store, ctx, "validator-1", tmp_path / "v")
    empty = {"version": 1, "round": ROUND + 1, "evaluate": {"outcomes": {}}}
    (tmp_path / "v" / "rounds" / f"{ROUND + 1}.json").write_text(json.dumps(empty))
    scored = v.score(ROUND + 1)
    before = _state(network.validators["v1"])["score"]
    assert scored["previous_round"] == ROUND
    assert scored["averages"] == pytest.approx({h: 0.5 * a for h, a in before["averages"].items()})
    assert scored["weights"]["uids"] == before["weights"]["uids"]
    assert scored["weights"]["weights"] == pytest.approx(before["weights"]["weights"])


# ----------------------------------------------------------------------------- refusals


def test_collect_refused_before_the_deadline_then_keeps_what_counts(ctx, tmp_path):
    ledger = FakeLedger(SCHEDULE)
    FakeChain(ledger, "owner").authorise_validator("validator-x")
    v = _validator(ledger, None, ctx, "validator-x", tmp_path / "v")
    on_time, late = signer("on-time").identity, signer("late").identity
    for identity in (on_time, late):
        FakeChain(ledger, identity).register()
    ledger.mine_to(DEADLINE - 1)
    with pytest.raises(RoundError, match=f"close at block {DEADLINE}"):
        v.collect(ROUND)
    ledger.mine_to(DEADLINE)  # the deadline block itself: commitments may still land in it
    with pytest.raises(RoundError, match="collect once a later block exists"):
        v.collect(ROUND)
    # A backend that recorded everything: a late one and one by an unregistered key.
    ledger.commitments[ROUND] = [
        Commitment(late, ROUND, "b" * 64, DEADLINE + 1),
        Commitment(signer("stranger").identity, ROUND, "c" * 64, DEADLINE - 2),
        Commitment(on_time, ROUND, "A" * 64, DEADLINE),
    ]
    ledger.mine_to(DEADLINE + 2)
    entries = v.collect(ROUND)["entries"]
    tiebreak = seeded_tiebreak(on_time, FakeChain(ledger, "x").block_hash(DEADLINE))
    assert entries == [dict(hotkey=on_time, digest="a" * 64, block=DEADLINE, tiebreak=tiebreak)]


def test_set_weights_refused_outside_the_weights_phase(network, ctx, tmp_path):
    ledger = FakeLedger(SCHEDULE)
    FakeChain(ledger, "owner").authorise_validator("validator-x")
    state = _state(network.validators["v1"])
    del state["set_weights"]
    (tmp_path / "v" / "rounds").mkdir(parents=True)
    (tmp_path / "v" / "rounds" / f"{ROUND}.json").write_text(json.dumps(state))
    v = _validator(ledger, network.store, ctx, "validator-x", tmp_path / "v")
    for block in (DEADLINE + 1, WEIGHTS[0] - 2, WEIGHTS[1]):  # the tx would land at block + 1
        ledger.mine_to(block)
        with pytest.raises(RoundError, match=f"blocks {WEIGHTS[0]}..{WEIGHTS[1]}"):
            v.set_weights(ROUND)
    assert ledger.weights == {}
    with pytest.raises(RoundError, match=r"run commit_weights\(2\) first"):
        v.set_weights(ROUND + 1)


def test_settings_and_arguments_are_validated(ctx, tmp_path):
    for bad in (
        dict(domain_batches=1),
        dict(ema_alpha=0.0),
        dict(confidence=1.0),
        dict(similarity_threshold=1.5),
        dict(general_tolerance=float("nan")),
        dict(max_manifest_bytes=1 << 20),
    ):
        with pytest.raises(ValueError):
            build(ValidatorSettings, bad)  # flat, as in [validator]
    ledger = FakeLedger(SCHEDULE)
    role_ctx = RoleContext(
        FakeChain(ledger, "v"),
        None,
        schedule=SCHEDULE,
        chain_label=CHAIN,
        task_id=TASK,
        base_dir=ctx.base,
        assignment_path=ctx.assignment_path,
    )
    kwargs = dict(
        domain_spec="corpus:math",
        general_specs=["corpus:prose"],
        state_dir=tmp_path / "v",
        settings=SETTINGS,
    )
    with pytest.raises(ValueError, match="forgetting guard"):
        Validator(role_ctx, **{**kwargs, "general_specs": []})
    with pytest.raises(ValueError, match="base or assignment missing"):
        Validator(dataclasses.replace(role_ctx, base_dir=tmp_path / "nope"), **kwargs)
    with pytest.raises(ValueError, match="pass hotkey="):
        read_only = FakeChain(ledger, None)  # a client that sends as no key
        Validator(dataclasses.replace(role_ctx, chain=read_only), **kwargs)


def test_explain_cli_reads_the_state_dir(network, capsys, tmp_path):

    state_dir = network.validators["v1"].state_dir
    assert main(["validator", "explain", "--round", str(ROUND), "--state-dir", str(state_dir)]) == 0
    out = capsys.readouterr().out
    k = network.keys
    line = next(ln for ln in out.splitlines() if k["dave"] in ln)
    assert "duplicate" in line and k["alice"] in line
    assert main(["validator", "explain", "--round", "99", "--state-dir", str(state_dir)]) == 2
    assert "no record of round 99" in capsys.readouterr().err


def test_oversized_and_rejected_deltas_are_not_kept(ctx, tmp_path):
    """A submission past the assignment's largest delta (a valid delta plus junk, under the
    8 MiB operator cap) is `too_large` without being downloaded; a delta evaluation refuses
    (trailing bytes) is deleted once its outcome is recorded. Both manifests stay."""
    from protocol.artifact.delta import max_delta_bytes
    from protocol.moe.experts import Assignment
    from protocol.moe.model import config_layout

    ledger = FakeLedger(SCHEDULE)
    store = FileStore(tmp_path / "store")
    FakeChain(ledger, "owner").authorise_validator("validator-x")
    for name in ("oscar", "mallory"):
        FakeChain(ledger, signer(name).identity).register()
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "commit")[0] - 1)
    bound = max_delta_bytes(config_layout(str(ctx.base)), Assignment.load(ctx.assignment_path))
    assert bound < SETTINGS.evaluation.max_artifact_bytes
    meta = _read(ctx.honest[0])[0]
    padded = tmp_path / "oscar.safetensors"
    padded.write_bytes(ctx.honest[0].read_bytes() + b"\0" * bound)
    # Within the bound but not a well-formed delta: 8 bytes past its data section.
    mallorys = declaring_shard(ctx.honest[1], TASK, signer("mallory").identity, tmp_path / "m")
    (tmp_path / "mallory.safetensors").write_bytes(mallorys.read_bytes() + b"\0" * 8)
    for name in ("oscar", "mallory"):
        key = signer(name)
        ref = store.put(tmp_path / f"{name}.safetensors")
        signed = sign(manifest_for(meta, ref, chain=CHAIN, task_id=TASK, hotkey=key.identity), key)
        (tmp_path / f"{name}.manifest.json").write_text(signed.to_json())
        store.put(tmp_path / f"{name}.manifest.json")
        FakeChain(ledger, key.identity).commit(ROUND, signed.commitment_digest())

    v = _validator(ledger, store, ctx, "validator-x", tmp_path / "v")
    v.run_round(ROUND, wait=ledger.mine_to)
    outcomes = _state(v)["evaluate"]["outcomes"]
    oscar, mallory = signer("oscar").identity, signer("mallory").identity
    assert (outcomes[oscar]["code"], outcomes[oscar]["rejection"]) == ("too_large", "too_large")
    assert str(bound) in outcomes[oscar]["reason"]
    assert outcomes[mallory]["rejection"] == "offsets", outcomes[mallory]
    folder = tmp_path / "v" / "artifacts" / str(ROUND)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{h}.manifest.json" for h in (oscar, mallory)
    )
