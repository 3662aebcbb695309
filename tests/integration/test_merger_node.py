"""The merger's round on a fake chain and a file store, after real validators set weights.

.venv/bin/python -m pytest -q tests/integration/test_merger_node.py

Two honest miners and one lazy one (noise) commit; two validators run their round and put
weights on chain; the merger collects the consensus, fetches the accepted deltas, merges and
guards them, exports and publishes the checkpoint. Then: a new merger instance finishing a
round it crashed in does not publish twice, and a guard with zero general tolerance keeps the
previous checkpoint and publishes nothing.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_validator_node import (  # the validator test's miners and settings, not its fixtures
    CHAIN,
    ROUND,
    SCHEDULE,
    TASK,
    _noise,
    _submit,
    _validator,
    signer,
)

from merger.node import (
    BEST_SINGLE,
    KEPT_PREVIOUS,
    MERGED,
    Merger,
    MergerSettings,
    RoundError,
    deltas_digest,
)
from moesaic.cli import main
from protocol.artifact.checkpoint import pull
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.config import build
from protocol.identity.hashing import sha256_dir
from protocol.round.context import RoleContext
from protocol.round.schedule import phase_bounds
from protocol.storage.file import FileStore

MERGE = phase_bounds(SCHEDULE, ROUND, "merge")
GUARD = dict(domain_batches=24, general_batches=24, seq_len=64, batch_size=4, max_tokens=20_000)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    work = tmp_path_factory.mktemp("merger_node")
    base, assignment = work / "base", work / "math.json"
    assert main(["base", "build", "--preset", "test", "--out", str(base), "--quiet"]) == 0
    args = ["experts", "select", "--model", str(base), "--data", "corpus:math"]
    args += ["--method", "token-ratio", "--p", "0.3", "--tokens", "8192", "--seq-len", "64"]
    assert main([*args, "--out", str(assignment), "--quiet"]) == 0
    honest = []
    for seed in (0, 1):
        out = work / f"honest-{seed}.safetensors"
        args = ["miner", "train", "--model", str(base), "--assignment", str(assignment)]
        args += ["--data", "corpus:math", "--steps", "16", "--lr", "1e-2", "--batch-size", "4"]
        args += ["--seq-len", "64", "--max-tokens", "20000", "--round", str(ROUND)]
        assert main([*args, "--seed", str(seed), "--out", str(out), "--quiet"]) == 0
        honest.append(out)
    return SimpleNamespace(work=work, base=base, assignment_path=assignment, honest=honest)


@pytest.fixture(scope="module")
def network(ctx):
    """Weights for ROUND on chain from two validators; the chain at the merge phase."""
    work, ledger = ctx.work, FakeLedger(SCHEDULE)
    store = FileStore(work / "store")
    owner = FakeChain(ledger, "owner")
    for v in ("validator-1", "validator-2"):
        owner.authorise_validator(v)
    owner.set_merger("merger")
    keys = {name: signer(name).identity for name in ("alice", "bob", "carol")}
    for identity in keys.values():
        FakeChain(ledger, identity).register()
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "commit")[0] - 1)
    artifacts = {
        "alice": ctx.honest[0],
        "bob": ctx.honest[1],
        "carol": _noise(work, "carol", ctx.honest[0], seed=1234),
    }
    shas = {name: _submit(ledger, store, work, name, path) for name, path in artifacts.items()}
    # Both validators commit their weights in the evaluate phase, then both reveal them.
    validators = [
        _validator(ledger, store, ctx, v, work / v) for v in ("validator-1", "validator-2")
    ]
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "evaluate")[0])  # miners reveal until then
    for v in validators:
        for step in (v.collect, v.fetch, v.evaluate, v.score, v.weights_salt):
            step(ROUND)
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "evaluate")[0] - 1)
    for v in validators:
        v.commit_weights(ROUND)
    for v in validators:
        v.run_round(ROUND, wait=ledger.mine_to)  # the finished steps, then the reveal
    return SimpleNamespace(ledger=ledger, store=store, keys=keys, shas=shas)


def _merger(ctx, network, state_dir, **settings):
    role_ctx = RoleContext(
        FakeChain(network.ledger, "merger"),
        network.store,
        schedule=SCHEDULE,
        chain_label=CHAIN,
        task_id=TASK,
        base_dir=ctx.base,
        assignment_path=ctx.assignment_path,
    )
    return Merger(
        role_ctx,
        domain_spec="corpus:math",
        general_specs=["corpus:prose", "corpus:code"],
        state_dir=state_dir,
        settings=build(MergerSettings, {**GUARD, "max_artifact_bytes": 8 << 20, **settings}),
    )


@pytest.fixture(scope="module")
def merged(ctx, network):
    """A merger that crashed after merge; a new instance on the same state publishes."""
    first = _merger(ctx, network, ctx.work / "m")
    with pytest.raises(RoundError, match="merge phase starts"):
        first.collect(ROUND)
    network.ledger.mine_to(MERGE[0])
    for step in (first.collect, first.fetch, first.merge):
        step(ROUND)
    restarted = _merger(ctx, network, ctx.work / "m")
    return SimpleNamespace(
        merger=restarted, record=restarted.run_round(ROUND, network.ledger.mine_to)
    )


def test_the_merge_is_published_and_loads(ctx, network, merged):
    record, ledger = merged.record, network.ledger
    # The guard may prefer the best single honest delta over the average: both publish.
    assert record["merge"]["decision"] in (MERGED, BEST_SINGLE), record["merge"]["reason"]
    assert record["publish"]["status"] == "sent"
    (checkpoint,) = ledger.checkpoints
    out = ctx.work / "m" / "checkpoints" / str(ROUND)
    assert checkpoint.digest == sha256_dir(out) == record["publish"]["digest"]
    assert checkpoint.deltas_digest == record["merge"]["deltas_digest"]
    assert merged.merger.current_base() == out
    pulled = pull(checkpoint, ctx.work / "pulled", max_bytes=64 << 20)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pulled)


def test_merge_beats_base_and_excludes_the_lazy_miner(network, merged):
    m, k = merged.record["merge"], network.keys
    print({name: c for name, c in m["candidates"].items()}, m["base_domain_mean"])
    chosen = MERGED if m["decision"] == MERGED else m["included"][0][0]
    assert m["candidates"][chosen]["domain_mean"] < m["base_domain_mean"]
    accepted = {a["hotkey"] for a in merged.record["collect"]["accepted"]}
    assert accepted == {k["alice"], k["bob"]}  # the lazy miner has no consensus weight
    included = {h: (sha, w) for h, sha, w in m["included"]}
    assert set(included) <= accepted and len(included) == (2 if chosen == MERGED else 1)
    shas = {network.shas[n] for n in ("alice", "bob")}
    assert {sha for sha, _ in included.values()} <= shas
    assert sum(w for _, w in included.values()) == pytest.approx(1.0)
    assert m["deltas_digest"] == deltas_digest(m["included"])


def test_restart_after_sending_does_not_publish_twice(ctx, network, merged):
    import shutil

    state = merged.merger.rounds.load(ROUND)
    del state["publish"]  # as if killed after the transaction, before recording it
    shutil.copytree(ctx.work / "m", ctx.work / "m2")
    again = _merger(ctx, network, ctx.work / "m2")
    again.rounds.save(ROUND, state)
    got = again.publish(ROUND)
    assert got["status"] == "already_on_chain"
    assert got["digest"] == merged.record["publish"]["digest"]
    assert len(network.ledger.checkpoints) == 1


def test_guard_keeps_the_previous_checkpoint(ctx, network, merged, tmp_path):
    strict = _merger(ctx, network, tmp_path / "strict", general_tolerance=0.0)
    before = list(network.ledger.checkpoints)
    record = strict.run_round(ROUND, network.ledger.mine_to)
    print(record["merge"]["reason"])
    assert record["merge"]["decision"] == KEPT_PREVIOUS
    # With no tolerance every delta fails the validators' rule, so nothing is even merged.
    excluded = record["merge"]["excluded"]
    assert excluded and all(e["code"] == "general_regression" for e in excluded.values())
    assert "general_regression" in record["merge"]["reason"]
    assert record["publish"] == {"status": "nothing_published", "reason": record["merge"]["reason"]}
    assert network.ledger.checkpoints == before
    assert strict.current_base() == ctx.base


def test_merge_holds_one_fetched_delta_at_a_time(ctx, network, merged, tmp_path, monkeypatch):
    """Every fetched delta read by the merge step is freed before the next read, and the saved
    delta is exactly the weighted average (or the chosen single) of the fetched files."""
    import gc
    import weakref

    from safetensors.torch import load_file

    import protocol.artifact.untrusted as reader
    from protocol.moe.merge import contributor_scale, scaled, weighted_average

    real, alive, most, reads = reader.read_delta_untrusted, [], [0], {}

    def tracked(path, **kw):
        most[0] = max(most[0], sum(r() is not None for r in alive))
        meta, delta = real(path, **kw)
        alive.extend(weakref.ref(t) for t in delta.values())
        reads.setdefault(str(path), []).append(kw)
        return meta, delta

    monkeypatch.setattr("merger.measure.read_delta_untrusted", tracked)  # what Reader calls
    again = _merger(ctx, network, tmp_path / "m")
    gc.disable()  # reference counting only: a delta kept by mistake stays alive
    try:
        for step in (again.collect, again.fetch, again.merge):
            step(ROUND)
    finally:
        gc.enable()
    state = again.rounds.load(ROUND)
    m, fetched = state["merge"], state["fetch"]["fetched"]
    assert most[0] == 0
    assert len(reads) == len(fetched) >= 2 and all(len(kws) >= 3 for kws in reads.values())
    saved = load_file(str(tmp_path / "m" / m["delta_path"]))

    def read(hotkey):
        path = str(tmp_path / "m" / fetched[hotkey]["path"])
        return real(path, **reads[path][0])[1]

    if m["decision"] == MERGED:  # the default "scaled" merge: the average times sqrt(N_eff)
        ws = [w for _, _, w in m["included"]]
        average = weighted_average([read(h) for h, _, _ in m["included"]], ws)
        expected = scaled(average, contributor_scale(ws, MergerSettings().max_scale))
    else:
        expected = read(m["included"][0][0])
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k].float(), expected[k].float()) for k in saved)
