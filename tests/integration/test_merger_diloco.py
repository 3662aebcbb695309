"""The DiLoCo path through the Merger over two rounds, with the lineage, and a restart.

.venv/bin/python -m pytest -q tests/integration/test_merger_diloco.py

Two honest miners train round R0 on the task base and round R1 on the checkpoint merged in R0
(pulled from the chain, as miners do); a validator's weights are set directly on chain (its
round is tested elsewhere). Merger A (method "diloco") publishes R0's checkpoint, which must
carry the outer state after its step (and a model card); in R1, A steps from that state. Merger
B starts R1 on an EMPTY state directory: it finds the outer state in R1's base checkpoint
(chain data) and computes a bit-identical R1 result.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_validator_node import CHAIN, ROUND, SCHEDULE, TASK, signer
from transformers import AutoTokenizer

from merger.node import MERGED, Merger, MergerSettings, guard
from miner.local import LocalJob, run_local
from moesaic.cli import main
from protocol.artifact.merge_state import MERGE_STATE_FILE, read_merge_state
from protocol.artifact.untrusted import read_delta_untrusted
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.config import build
from protocol.identity.hashing import sha256_dir
from protocol.moe.evaluate import Evaluator, build_eval_set
from protocol.moe.experts import Assignment
from protocol.moe.merge import DiLoCoOuter, weighted_average
from protocol.moe.model import config_layout, expert_layout, load_model
from protocol.round.context import RoleContext
from protocol.round.lineage import Lineage
from protocol.round.manifest import manifest_for, sign
from protocol.round.schedule import phase_bounds
from protocol.round.shards import shard_key
from protocol.settings import EvalSettings, TrainSettings
from protocol.storage.file import FileStore

R0, R1 = ROUND, ROUND + 1
GUARD = dict(domain_batches=16, general_batches=16, seq_len=64, batch_size=4, max_tokens=20_000)
MINERS = {"alice": 0, "bob": 1}  # name -> training seed


def _train(work, base_dir, assignment, task_base_hash, name, seed, r):
    out = work / f"{name}-{r}.safetensors"
    train = TrainSettings(steps=16, lr=1e-2, batch_size=4, seq_len=64, max_tokens=20_000)
    job = LocalJob(
        model=str(base_dir), assignment=str(assignment), data="corpus:math", out=str(out),
        train=TrainSettings(**{**train.__dict__, "seed": seed + 10 * r, "device": "cpu"}),
        round=r, assignment_base=task_base_hash,
        shard=shard_key(TASK, signer(name).identity, r),  # as the miner's own shard
    )  # fmt: skip
    run_local(job, progress=False)
    return out


def _submit(net, name, path, r):
    """Sign the delta's manifest, put both in the store, commit its digest for round r."""
    from protocol.artifact.delta import METADATA_KEY, DeltaMeta
    from protocol.artifact.untrusted import read_header_untrusted

    key = signer(name)
    ref = net.store.put(path, name=f"{name}-{r}.safetensors")
    header, _ = read_header_untrusted(path)
    meta = DeltaMeta.from_json(header["__metadata__"][METADATA_KEY])
    signed = sign(manifest_for(meta, ref, chain=CHAIN, task_id=TASK, hotkey=key.identity), key)
    manifest = net.work / f"{name}-{r}.manifest.json"
    manifest.write_text(signed.to_json())
    net.store.put(manifest)
    FakeChain(net.ledger, key.identity).commit(r, signed.commitment_digest())


def _play(net, r):
    """Miners train on round r's base and commit; the validator's weights go on chain."""
    base_dir, _ = net.lineage.base_for(r)
    paths = {
        n: _train(net.work, base_dir, net.assignment, net.task_hash, n, seed, r)
        for n, seed in MINERS.items()
    }
    net.ledger.mine_to(phase_bounds(SCHEDULE, r, "commit")[0] - 1)
    for name, path in paths.items():
        _submit(net, name, path, r)
    uid = {m.hotkey: m.uid for m in FakeChain(net.ledger, "owner").members()}
    uids = [uid[signer(n).identity] for n in MINERS]
    validator = FakeChain(net.ledger, "validator-1")
    net.ledger.mine_to(phase_bounds(SCHEDULE, r, "evaluate")[0] - 1)
    validator.commit_weights(r, uids, [3.0, 1.0], bytes(32))
    net.ledger.mine_to(phase_bounds(SCHEDULE, r, "weights")[0] - 1)
    validator.set_weights(r, uids, [3.0, 1.0], bytes(32))
    return paths


def _merger(net, name) -> Merger:
    chain = FakeChain(net.ledger, "merger")
    lineage = Lineage(chain, task_base=net.base, cache_dir=net.work / name / "bases")
    ctx = RoleContext(
        chain, net.store, schedule=SCHEDULE, chain_label=CHAIN, task_id=TASK, base_dir=net.base,
        assignment_path=net.assignment, lineage=lineage,
    )  # fmt: skip
    settings = {**GUARD, "max_artifact_bytes": 8 << 20, "method": "diloco"}
    return Merger(
        ctx, domain_spec="corpus:math", general_specs=["corpus:prose", "corpus:code"],
        state_dir=net.work / name, settings=build(MergerSettings, settings),
    )  # fmt: skip


@pytest.fixture(scope="module")
def net(tmp_path_factory, test_base, test_assignment):
    work = tmp_path_factory.mktemp("merger_diloco")
    ledger = FakeLedger(SCHEDULE)
    owner = FakeChain(ledger, "owner")
    owner.authorise_validator("validator-1")
    owner.set_merger("merger")
    for name in MINERS:
        FakeChain(ledger, signer(name).identity).register()
    net = SimpleNamespace(work=work, ledger=ledger, store=FileStore(work / "store"))
    net.base, net.assignment, net.task_hash = test_base, test_assignment, sha256_dir(test_base)
    # the miners' view of the lineage (their own cache)
    net.lineage = Lineage(FakeChain(ledger, "owner"), task_base=test_base, cache_dir=work / "mc")
    _play(net, R0)
    a = _merger(net, "A")
    net.first = a.run_round(R0, wait=ledger.mine_to)
    net.paths = _play(net, R1)
    net.second = a.run_round(R1, wait=ledger.mine_to)
    b = _merger(net, "B")  # a new merger: nothing in its state directory
    net.restarted = b.run_round(R1, wait=ledger.mine_to)
    return net


def test_round_0_publishes_the_outer_state_and_a_card(net):
    m = net.first["merge"]
    assert m["decision"] == MERGED, m["reason"]
    assert net.first["publish"]["status"] == "sent"
    out = net.work / "A" / "checkpoints" / str(R0)
    assert sha256_dir(out) == net.first["publish"]["digest"]  # the state is in the digest
    state = read_merge_state(out)
    local = DiLoCoOuter.load(net.work / "A" / "outer" / f"{R0}.safetensors")
    assert state.outer.steps == local.steps == 1
    assert state.outer.buffers.keys() == local.buffers.keys()
    assert all(torch.equal(state.outer.buffers[k], local.buffers[k]) for k in local.buffers)
    assert state.residual == {}  # a float32 base
    card = (out / "README.md").read_text()
    for hotkey, sha, _ in m["included"]:
        assert hotkey in card and sha in card
    assert "library_name: transformers" in card and "--method diloco" in card
    # both selection and guard sets recorded, disjoint by construction, flag for the devnet
    assert m["guard"]["seed"] != m["seed"]
    assert m["guard"]["eval_set_digest"] != m["eval_set_digest"]
    assert isinstance(m["merge_beats_best_single"], bool)


def test_the_decision_is_the_second_sets(net):
    """Each round's decision is the guard's on the second set's numbers alone; the selection
    set only chose the best single (here round R1's merge won there and lost on the second)."""
    for record in (net.first, net.second):
        m = record["merge"]
        best = m["best_single"]
        singles = {h: c for h, c in m["candidates"].items() if h not in (MERGED, *m["excluded"])}
        assert best == min(singles, key=lambda h: (singles[h]["domain_mean"], h))
        g = m["guard"]
        assert set(g["candidates"]) == {MERGED, best}
        s = MergerSettings()
        again = guard(g["candidates"], s.evaluation.general_tolerance,
                      s.cumulative_general_tolerance, g["base_domain_mean"])  # fmt: skip
        assert again[0] == m["decision"], m["reason"]
        beats = g["candidates"][MERGED]["domain_mean"] < g["candidates"][best]["domain_mean"]
        assert m["merge_beats_best_single"] == beats


def test_round_1_steps_from_the_state_its_base_carries(net):
    m = net.second["merge"]
    base_dir = net.work / "A" / "bases" / net.first["publish"]["digest"]
    assert (base_dir / MERGE_STATE_FILE).is_file()  # pulled with the checkpoint
    carried = read_merge_state(base_dir).outer
    fetched = net.second["fetch"]["fetched"]
    included = [h for h in sorted(fetched) if h not in m["excluded"]]
    assert included, m["excluded"]
    weights = [fetched[h]["weight"] for h in included]
    # The merge candidate is the outer step from the carried momentum, not a fresh one.
    layout, assignment = config_layout(str(base_dir)), Assignment.load(net.assignment)
    deltas = [
        read_delta_untrusted(net.work / "A" / fetched[h]["path"], layout=layout,
                             assignment=assignment, max_bytes=8 << 20)[1]
        for h in included
    ]  # fmt: skip
    average = weighted_average(deltas, weights)
    expected = DiLoCoOuter(lr=0.7, momentum=0.9, steps=carried.steps, buffers=dict(carried.buffers))
    expected = expected.step(average)
    fresh = DiLoCoOuter(lr=0.7, momentum=0.9).step(average)
    # Measured as the merger measures (same eval set, same evaluator): the recorded merge
    # candidate's loss is the carried step's, bit for bit, and not a fresh outer step's.
    model = load_model(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    eval_set = build_eval_set(tokenizer, "corpus:math", ["corpus:prose", "corpus:code"],
                              m["seed"], **EvalSettings(**GUARD).eval_set_sizes())  # fmt: skip
    assert eval_set.digest() == m["eval_set_digest"]
    evaluator = Evaluator(model, expert_layout(model), eval_set)
    loss = lambda d: math.fsum(evaluator.evaluate(d)[0]) / len(eval_set.domain)  # noqa: E731
    assert loss(expected) == m["candidates"][MERGED]["domain_mean"]
    assert loss(fresh) != m["candidates"][MERGED]["domain_mean"]
    if m["decision"] == MERGED:
        chosen = load_file(str(net.work / "A" / m["delta_path"]))
        assert all(torch.equal(chosen[k], expected[k]) for k in expected)
        published = read_merge_state(net.work / "A" / "checkpoints" / str(R1))
        assert published.outer.steps == 2


def test_the_card_command_recomputes_the_checkpoint(net):
    """The model card's `moesaic merge` line, on the pulled base and the fetched deltas, writes
    the checkpoint's weights and merge state byte for byte."""
    m, out = net.second["merge"], net.work / "A" / "checkpoints" / str(R1)
    assert m["decision"] in (MERGED, "best_single"), m["reason"]
    card = (out / "README.md").read_text()
    (line,) = [x for x in card.splitlines() if x.startswith("moesaic merge ")]
    fetched = net.second["fetch"]["fetched"]
    paths = {f"delta-{i}.safetensors": str(net.work / "A" / fetched[h]["path"])
             for i, (h, _, _) in enumerate(m["included"])}  # fmt: skip
    base_dir = net.work / "A" / "bases" / net.first["publish"]["digest"]
    swap = {"base": str(base_dir), "ASSIGNMENT.json": str(net.assignment), **paths}
    swap["recomputed"] = str(net.work / "recomputed")
    argv = [swap.get(x, x) for x in line.split()[1:]]
    assert main(argv) == 0
    for name in ("model.safetensors", MERGE_STATE_FILE):
        assert (net.work / "recomputed" / name).read_bytes() == (out / name).read_bytes(), name


def test_a_merger_on_an_empty_state_dir_resumes_the_same_trajectory(net):
    a, b = net.second["merge"], net.restarted["merge"]
    assert not (net.work / "B" / "outer" / f"{R0}.safetensors").exists()  # nothing local
    for key in ("decision", "candidates", "guard", "included", "excluded", "deltas_digest"):
        assert a.get(key) == b.get(key), key
    if a["delta_path"] is not None:
        ours = (net.work / "A" / a["delta_path"]).read_bytes()
        assert (net.work / "B" / b["delta_path"]).read_bytes() == ours  # bit-identical
        assert net.restarted["publish"]["status"] == "already_on_chain"
