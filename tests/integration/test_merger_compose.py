"""Two tasks at once: the merger composes math and prose experts into one checkpoint.

.venv/bin/python -m pytest -q tests/integration/test_merger_compose.py

The prose task's experts are selected with `--exclude` the math assignment, so the two tasks
train disjoint experts of the same base. Two miners per task commit signed manifests naming
their task; one validator per task has put weights on chain (set directly here: the
validator's own round is tested elsewhere). The merger, configured with the math task and
`compose` = the prose task, fetches each delta under its own task's rules, merges and guards
each task on its own domain, and publishes ONE checkpoint in which both tasks' experts (and
no others) changed.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from shard_files import declaring_shard
from test_validator_node import CHAIN, ROUND, SCHEDULE, signer

from merger.core import TaskSpec, check_disjoint
from merger.node import COMPOSED, KEPT_PREVIOUS, Merger, MergerSettings
from moesaic.cli import main
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.moe.experts import Assignment
from protocol.round.context import RoleContext
from protocol.round.manifest import manifest_for, sign
from protocol.round.schedule import phase_bounds
from protocol.settings import EvalSettings
from protocol.storage.file import FileStore

GUARD = dict(domain_batches=16, general_batches=16, seq_len=64, batch_size=4, max_tokens=20_000)
# Prose, not code, as the second task: on the test base, code deltas trained on the experts
# left after math's make held-out code WORSE (about -0.02 nats at lr 1e-2), so the merger's
# zero-score exclusion (the validators' rule, this round) rightly merges none of them.
TASKS = {0: "corpus:math", 1: "corpus:prose"}


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory, test_base, test_assignment):
    work = tmp_path_factory.mktemp("compose")
    code = work / "prose.json"
    args = ["experts", "select", "--model", str(test_base), "--data", TASKS[1]]
    args += ["--method", "token-ratio", "--p", "0.3", "--tokens", "8192", "--seq-len", "64"]
    assert main([*args, "--exclude", str(test_assignment), "--out", str(code), "--quiet"]) == 0
    assignments = {0: test_assignment, 1: code}
    deltas = {}
    for task, data in TASKS.items():
        for seed in (0, 1):
            out = work / f"task{task}-{seed}.safetensors"
            args = ["miner", "train", "--model", str(test_base)]
            args += ["--assignment", str(assignments[task]), "--data", data, "--steps", "16"]
            args += ["--lr", "1e-2", "--batch-size", "4", "--seq-len", "64"]
            args += ["--max-tokens", "20000", "--round", str(ROUND), "--seed", str(seed)]
            assert main([*args, "--out", str(out), "--quiet"]) == 0
            deltas[f"m{task}{seed}"] = (task, out)
    return SimpleNamespace(work=work, base=test_base, assignments=assignments, deltas=deltas)


def _commit(ledger, store, work, name, task, delta_path):
    from protocol.artifact.delta import METADATA_KEY, DeltaMeta
    from protocol.artifact.untrusted import read_header_untrusted

    key = signer(name)
    FakeChain(ledger, key.identity).register()
    delta_path = declaring_shard(delta_path, task, key.identity, work / f"{name}.delta.safetensors")
    ref = store.put(delta_path, name=f"{name}.safetensors")
    header, _ = read_header_untrusted(delta_path)
    meta = DeltaMeta.from_json(header["__metadata__"][METADATA_KEY])
    manifest = manifest_for(meta, ref, chain=CHAIN, task_id=task, hotkey=key.identity)
    signed = sign(manifest, key)
    (work / f"{name}.manifest.json").write_text(signed.to_json())
    store.put(work / f"{name}.manifest.json")
    return key.identity, signed.commitment_digest()


@pytest.fixture(scope="module")
def composed(two_tasks):
    t = two_tasks
    ledger, store = FakeLedger(SCHEDULE), FileStore(t.work / "store")
    owner = FakeChain(ledger, "owner")
    for v in ("validator-math", "validator-prose"):
        owner.authorise_validator(v)
    owner.set_merger("merger")
    committed = {
        name: _commit(ledger, store, t.work, name, task, path)
        for name, (task, path) in t.deltas.items()
    }
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "commit")[0] - 1)
    for hotkey, digest in committed.values():
        FakeChain(ledger, hotkey).commit(ROUND, digest)
    uid = {m.hotkey: m.uid for m in FakeChain(ledger, "owner").members()}
    votes = {
        v: [uid[committed[n][0]] for n, (k, _) in t.deltas.items() if k == task]
        for v, task in (("validator-math", 0), ("validator-prose", 1))
    }
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "evaluate")[0] - 1)
    for v, mine in votes.items():
        FakeChain(ledger, v).commit_weights(ROUND, mine, [1.0] * len(mine), bytes(32))
    ledger.mine_to(phase_bounds(SCHEDULE, ROUND, "weights")[0] - 1)
    for v, mine in votes.items():
        FakeChain(ledger, v).set_weights(ROUND, mine, [1.0] * len(mine), bytes(32))
    role_ctx = RoleContext(
        FakeChain(ledger, "merger"), store, schedule=SCHEDULE, chain_label=CHAIN, task_id=0,
        base_dir=t.base, assignment_path=t.assignments[0],
    )  # fmt: skip
    merger = Merger(
        role_ctx, domain_spec=TASKS[0],
        general_specs=["corpus:prose", "corpus:code"], state_dir=t.work / "merger",
        settings=MergerSettings(EvalSettings(**GUARD, max_artifact_bytes=8 << 20)),
        compose=[(1, t.assignments[1], TASKS[1])],
    )  # fmt: skip
    record = merger.run_round(ROUND, wait=ledger.mine_to)
    return SimpleNamespace(record=record, ledger=ledger, committed=committed, merger=merger)


@pytest.mark.slow
def test_both_tasks_experts_land_in_one_checkpoint(two_tasks, composed):
    t, record = two_tasks, composed.record
    merge = record["merge"]
    assert merge["decision"] == COMPOSED, merge["reason"]
    assert set(merge["tasks"]) == {"0", "1"}
    assert all(merge["tasks"][k]["decision"] != KEPT_PREVIOUS for k in ("0", "1")), merge
    # Each fetched delta was checked under its own task's rules and remembered its task.
    fetched = record["fetch"]["fetched"]
    by_task = {h: f["task_id"] for h, f in fetched.items()}
    assert by_task == {hotkey: task for (hotkey, _), (task, _) in
                       zip(composed.committed.values(), t.deltas.values(), strict=True)}  # fmt: skip
    included = {h for h, _, _ in merge["included"]}
    assert {by_task[h] for h in included} == {0, 1}

    (checkpoint,) = composed.ledger.checkpoints
    out = t.work / "merger" / "checkpoints" / str(ROUND)
    assert (
        record["publish"]["status"] == "sent" and checkpoint.digest == record["publish"]["digest"]
    )
    changed = {tuple(p) for p in json.loads((out / "moesaic.json").read_text())["experts"]}
    union = set(Assignment.load(t.assignments[0]).pairs()) | set(
        Assignment.load(t.assignments[1]).pairs()
    )
    assert changed == union  # both tasks' experts, and nothing else


def test_overlapping_tasks_are_refused_with_the_fix_named(test_assignment):
    math = Assignment.load(test_assignment)
    with pytest.raises(ValueError, match="experts select --exclude"):
        check_disjoint([TaskSpec(0, math, "corpus:math"), TaskSpec(1, math, "corpus:code")])
    with pytest.raises(ValueError, match="task ids repeat"):
        check_disjoint([TaskSpec(0, math, "a"), TaskSpec(0, math, "b")])
