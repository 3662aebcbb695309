"""The miner's round (miner/node.py) on the test-preset base, a FakeChain and a FileStore:
a full round a validator accepts, nothing uploaded before the commit deadline (commit, then
reveal), and restarts after a crash at each step boundary.

Two real trainings in all (a full round, and one trained work dir that the resume tests copy).
"""

import dataclasses
import hashlib
import json
import shutil

import pytest

import miner.node as node
from miner.node import (
    Miner,
    RoundConflict,
    TrainSettings,
    WrongPhase,
    check_commit_phase,
    check_reveal_phase,
)
from moesaic.cli import main
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.identity.keys import EthSigner
from protocol.round.context import RoleContext
from protocol.round.schedule import Schedule, phase_bounds
from protocol.round.shards import shard_key
from protocol.storage.file import FileStore

SCHEDULE = Schedule()  # round 0 commits land in blocks 20..24
COMMIT_FIRST, COMMIT_LAST = phase_bounds(SCHEDULE, 0, "commit")
SIGNER = EthSigner("0x" + "11" * 32)
OTHER = EthSigner("0x" + "22" * 32)
LABEL = "evm:31337:0x" + "ab" * 20
SETTINGS = TrainSettings(steps=6, lr=1e-2, batch_size=4, seq_len=64, max_tokens=20000)


class CountingSigner:
    """An EthSigner that counts signatures (ECDSA here is deterministic, so bytes alone could
    not tell a re-signature from a reused one)."""

    def __init__(self, inner):
        self.inner, self.identity, self.calls = inner, inner.identity, 0

    def sign(self, message: bytes) -> str:
        self.calls += 1
        return self.inner.sign(message)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("miner-node")


@pytest.fixture(scope="module")
def base(work):
    out = work / "base"
    assert main(["base", "build", "--preset", "test", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def assignment(work, base):
    out = work / "math.json"
    args = ["experts", "select", "--model", str(base), "--data", "corpus:math"]
    args += ["--tokens", "8192", "--seq-len", "64", "--out", str(out), "--quiet"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def store(work):
    return FileStore(work / "store")


def registered(signer=SIGNER) -> tuple[FakeLedger, FakeChain]:
    ledger = FakeLedger(SCHEDULE)
    chain = FakeChain(ledger, signer.identity)
    chain.register()
    return ledger, chain


def make_miner(chain, store, base, assignment, work_dir, signer=SIGNER) -> Miner:
    ctx = RoleContext(
        chain,
        store,
        schedule=SCHEDULE,
        chain_label=LABEL,
        task_id=0,
        base_dir=base,
        assignment_path=assignment,
        signer=signer,
    )
    return Miner(
        ctx,
        data_spec="corpus:math",
        work_dir=work_dir,
        train=SETTINGS,
        quiet=True,
    )


@pytest.fixture(scope="module")
def trained(work, base, assignment, store):
    """A work dir whose round 0 is trained (nothing signed or uploaded); tests copy it."""
    out = work / "trained"
    make_miner(registered()[1], store, base, assignment, out).train(0)
    return out


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "miner")


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the miner retrained a round that was already trained")

    monkeypatch.setattr("miner.local.run_local", refuse)


def state_of(work_dir, rnd=0) -> dict:
    return json.loads((work_dir / "rounds" / f"{rnd}.json").read_text())


def test_full_round_is_what_a_validator_accepts(base, assignment, store, tmp_path, caplog):
    from protocol.artifact.delta import max_delta_bytes
    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment
    from protocol.moe.model import expert_layout, load_model
    from protocol.round.manifest import SignedManifest, check_manifest, delta_matches_manifest

    ledger, chain = registered()
    miner = make_miner(chain, store, base, assignment, tmp_path / "miner")
    with caplog.at_level("INFO", logger="moesaic.miner"):
        summary = miner.run_round(0, ledger.mine_to)
    assert "committed" in caplog.text and "revealed" in caplog.text

    [c] = chain.commitments(0)
    assert (c.hotkey, c.digest) == (SIGNER.identity, summary["manifest_digest"])
    assert COMMIT_FIRST <= c.block <= COMMIT_LAST
    assert summary["commit_block"] == c.block and summary["tokens"] > 0
    assert summary["reveal_block"] > COMMIT_LAST  # uploaded once the deadline had passed
    # The commitment is the sha256 of the manifest object, fetched from the store by it.
    raw = store.get(
        summary["manifest_uri"], tmp_path / "m.json", expected_sha256=c.digest, max_bytes=8192
    ).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == c.digest
    a, base_hash = Assignment.load(assignment), sha256_dir(base)
    verdict = check_manifest(
        raw,
        commitment=c,
        expected_chain=LABEL,
        expected_round=0,
        expected_task_id=0,
        expected_base_hash=base_hash,
        expected_assignment_hash=a.hash(),
        registered_hotkeys=[m.hotkey for m in chain.members()],
        deadline_block=COMMIT_LAST,
        max_artifact_bytes=1 << 24,
    )
    assert verdict.ok, verdict
    m = SignedManifest.from_json(raw).manifest
    assert (m.artifact_sha256, m.artifact_size, m.uri) == (
        summary["delta_sha256"],
        summary["bytes"],
        summary["delta_uri"],
    )
    # The delta it names passes the validator's untrusted reader and matches the claims.
    delta = store.get(
        m.uri, tmp_path / "d.st", expected_sha256=m.artifact_sha256, max_bytes=1 << 24
    )
    layout = expert_layout(load_model(base))
    meta, _ = read_delta_untrusted(
        delta,
        layout=layout,
        assignment=a,
        max_bytes=max_delta_bytes(layout, a),
        expected_base_hash=base_hash,
        expected_round=0,
        expected_shard=shard_key(0, SIGNER.identity, 0),
        expected_sha256=m.artifact_sha256,
    )
    assert meta.shard == shard_key(0, SIGNER.identity, 0)  # the shard its data was read in
    assert delta_matches_manifest(meta, m).ok
    # Running the round again is a no-op: same summary, still one commitment.
    assert miner.run_round(0, ledger.mine_to) == summary
    assert len(chain.commitments(0)) == 1


def test_each_round_declares_its_own_shard_and_keeps_the_optimizer_when_asked(
    base, assignment, store, tmp_path, caplog
):
    """Rounds 0 and 1 read the train split in their own shard's order and declare it; with
    keep_optimizer, round 1 starts from round 0's AdamW state (miner/optimizer_state.py)."""
    ledger, chain = registered()
    miner = make_miner(chain, store, base, assignment, tmp_path / "m")
    miner.settings = dataclasses.replace(SETTINGS, keep_optimizer=True)
    with caplog.at_level("INFO", logger="moesaic.miner"):
        for r in (0, 1):
            miner.train(r)
    shards = [state_of(tmp_path / "m", r)["trained"]["meta"]["shard"] for r in (0, 1)]
    assert shards == [shard_key(0, SIGNER.identity, r) for r in (0, 1)]
    rounds = tmp_path / "m" / "rounds"
    assert (rounds / "optimizer.0.pt").is_file() and (rounds / "optimizer.1.pt").is_file()
    assert "round 1: optimizer state of round 0 loaded" in caplog.text


def test_restart_after_train_does_not_retrain(
    copy_of_trained, trained, base, assignment, store, no_training
):
    delta = copy_of_trained / "rounds" / "0.delta.safetensors"
    mtime = delta.stat().st_mtime_ns
    ledger, chain = registered()
    summary = make_miner(chain, store, base, assignment, copy_of_trained).run_round(
        0, ledger.mine_to
    )
    assert delta.stat().st_mtime_ns == mtime
    assert summary["delta_sha256"] == state_of(trained)["trained"]["sha256"]
    assert [c.digest for c in chain.commitments(0)] == [summary["manifest_digest"]]


def test_lost_delta_after_reveal_is_fetched_back_not_retrained(
    copy_of_trained, base, assignment, store, no_training
):
    ledger, chain = registered()
    miner = make_miner(chain, store, base, assignment, copy_of_trained)
    sha256 = miner.run_round(0, ledger.mine_to)["delta_sha256"]
    path = copy_of_trained / "rounds" / "0.delta.safetensors"
    path.unlink()
    assert miner.train(0) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def test_changed_delta_after_reveal_is_fetched_back_not_retrained(
    copy_of_trained, base, assignment, store, no_training
):
    """The train step's digest hook: a recorded delta whose file no longer matches its sha256
    is restored from the store once revealed (its bytes are named by the commitment)."""
    ledger, chain = registered()
    miner = make_miner(chain, store, base, assignment, copy_of_trained)
    sha256 = miner.run_round(0, ledger.mine_to)["delta_sha256"]
    path = copy_of_trained / "rounds" / "0.delta.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert miner.train(0) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    assert state_of(copy_of_trained)["trained"]["sha256"] == sha256


def test_delta_lost_after_signing_before_reveal_is_an_error_not_retrained(
    copy_of_trained, base, assignment, tmp_path, no_training
):
    """Signed bytes are fixed (a new delta would be a new digest) and the store has no copy
    before the reveal: the miner says so instead of retraining or re-signing."""
    miner = make_miner(
        registered()[1], FileStore(tmp_path / "s"), base, assignment, copy_of_trained
    )
    miner.sign_manifest(0)
    (copy_of_trained / "rounds" / "0.delta.safetensors").unlink()
    with pytest.raises(RoundConflict, match="never revealed; it cannot be re-signed"):
        miner.train(0)


def test_crash_after_commit_sent_does_not_commit_twice(copy_of_trained, base, assignment, store):
    ledger, chain = registered()
    first = make_miner(chain, store, base, assignment, copy_of_trained)
    digest = first.sign_manifest(0)
    ledger.mine_to(COMMIT_FIRST - 1)
    block = chain.commit(0, digest)  # sent, then the process died before recording it
    assert state_of(copy_of_trained)["committed"] is None

    again = make_miner(chain, store, base, assignment, copy_of_trained)
    summary = again.run_round(0, ledger.mine_to)  # FakeChain would raise AlreadyCommitted
    assert [c.digest for c in chain.commitments(0)] == [digest]
    assert summary["commit_block"] == block == state_of(copy_of_trained)["committed"]["block"]


class StaleCommitments:
    """A chain client whose first commitments() read predates a commit already in flight."""

    def __init__(self, chain):
        self.chain, self.address, self.stale = chain, chain.address, True

    def commitments(self, rnd):
        if self.stale:
            self.stale = False
            return []
        return self.chain.commitments(rnd)

    def __getattr__(self, name):
        return getattr(self.chain, name)


def test_commit_racing_an_earlier_send_is_recorded_not_raised(
    copy_of_trained, base, assignment, store
):
    ledger, chain = registered()
    miner = make_miner(StaleCommitments(chain), store, base, assignment, copy_of_trained)
    digest = miner.sign_manifest(0)
    ledger.mine_to(COMMIT_FIRST)
    block = chain.commit(0, digest)  # the earlier send lands after the miner looked
    assert miner.commit(0) == block and len(chain.commitments(0)) == 1


def test_manifest_is_signed_once_across_restarts(copy_of_trained, base, assignment, tmp_path):
    signer, store = CountingSigner(SIGNER), FileStore(tmp_path / "own-store")
    miner = make_miner(registered()[1], store, base, assignment, copy_of_trained, signer)
    digest = miner.sign_manifest(0)
    path = copy_of_trained / "rounds" / "0.manifest.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert list(store.list()) == []  # signed locally: nothing leaves before the deadline
    assert miner.sign_manifest(0) == digest and signer.calls == 1
    # Crash after signing and writing the file, before recording it: the file is reused.
    state_file = copy_of_trained / "rounds" / "0.json"
    state = state_of(copy_of_trained)
    state_file.write_text(json.dumps({**state, "manifest": None}))
    assert miner.sign_manifest(0) == digest and signer.calls == 1
    # A recorded manifest whose bytes are gone before its reveal is an error, never a
    # re-signature (after the reveal it is fetched back from the store).
    path.unlink()
    with pytest.raises(RoundConflict, match="cannot be re-signed"):
        miner.sign_manifest(0)


def test_commit_outside_the_commit_phase_is_refused(copy_of_trained, base, assignment, store):
    ledger, chain = registered()
    miner = make_miner(chain, store, base, assignment, copy_of_trained)
    with pytest.raises(ValueError, match=r"sign_manifest\(0\) has not run yet"):
        miner.commit(0)
    miner.sign_manifest(0)
    with pytest.raises(WrongPhase, match=r"not open yet: .* blocks 20\.\.24, the next block is 2 "):
        miner.commit(0)
    ledger.mine_to(COMMIT_LAST)
    with pytest.raises(WrongPhase, match=r"over: .* next block is 25 \(round 0, reveal phase\)"):
        miner.commit(0)
    assert chain.commitments(0) == [] and state_of(copy_of_trained)["committed"] is None


class RecordingStore:
    """A FileStore that notes the chain's block at every put: when did bytes leave?"""

    def __init__(self, inner, ledger):
        self.inner, self.ledger, self.puts = inner, ledger, []

    def put(self, path, **kwargs):
        ref = self.inner.put(path, **kwargs)
        self.puts.append((self.ledger.height, ref.sha256))
        return ref

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_miner_uploads_nothing_before_the_commit_deadline(
    copy_of_trained, base, assignment, tmp_path, no_training
):
    """The front-runner's window closed: until the chain is past the deadline the store holds
    nothing of this miner, and then exactly the committed manifest and the delta it names."""
    ledger, chain = registered()
    store = RecordingStore(FileStore(tmp_path / "watched"), ledger)
    miner = make_miner(chain, store, base, assignment, copy_of_trained)
    committed = miner.commit_round(0, ledger.mine_to)
    assert committed["commit_block"] <= COMMIT_LAST and store.puts == []
    assert list(store.list()) == []
    summary = miner.run_round(0, ledger.mine_to)
    assert {sha for _, sha in store.puts} == {summary["manifest_digest"], summary["delta_sha256"]}
    assert all(block > COMMIT_LAST for block, _ in store.puts), store.puts
    # The manifest signed before the upload names the uri the store then gave the delta.
    assert (
        summary["delta_uri"]
        == store.inner.put(
            copy_of_trained / "rounds" / "0.delta.safetensors", name="0.delta.safetensors"
        ).uri
    )


def test_reveal_before_the_deadline_is_refused(copy_of_trained, base, assignment, tmp_path):
    ledger, chain = registered()
    store = FileStore(tmp_path / "s")
    miner = make_miner(chain, store, base, assignment, copy_of_trained)
    miner.commit_round(0, ledger.mine_to)
    ledger.mine_to(COMMIT_LAST)  # the deadline block itself: still too early
    with pytest.raises(WrongPhase, match="commit phase is not over"):
        miner.reveal(0)
    assert list(store.list()) == [] and state_of(copy_of_trained)["revealed"] is None


def test_reveal_reputs_what_the_store_lost(copy_of_trained, base, assignment, tmp_path):
    """A reveal killed half way (or an object lost after it) runs again and puts it back."""
    ledger, chain = registered()
    store = FileStore(tmp_path / "s")
    miner = make_miner(chain, store, base, assignment, copy_of_trained)
    summary = miner.run_round(0, ledger.mine_to)
    store.delete(summary["manifest_digest"])
    assert miner.reveal(0).sha256 == summary["delta_sha256"]
    assert store.exists(summary["manifest_digest"]) and store.exists(summary["delta_sha256"])
    assert [c.digest for c in chain.commitments(0)] == [summary["manifest_digest"]]


def test_signer_must_be_the_chain_key(base, assignment, store, tmp_path):
    ledger = FakeLedger(SCHEDULE)
    with pytest.raises(ValueError, match="not the chain client's key"):
        make_miner(FakeChain(ledger, OTHER.identity), store, base, assignment, tmp_path)
    read_only = FakeChain(ledger, SIGNER.identity)
    read_only.address = None
    with pytest.raises(ValueError, match="read-only"):
        make_miner(read_only, store, base, assignment, tmp_path)
    # EVM addresses compare case-insensitively.
    make_miner(FakeChain(ledger, SIGNER.identity.lower()), store, base, assignment, tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"lr": float("nan")},
        {"batch_size": 2.5},
        {"seed": -1},
        {"encoding": "int4"},
        {"encoding": "lowrank08"},
    ],
)
def test_train_settings_are_validated(bad):
    with pytest.raises(ValueError, match="train\\."):
        TrainSettings(**bad)


def test_round_seed_and_commit_window_are_pure():
    seeds = {node.round_seed(0, r) for r in range(50)}
    assert len(seeds) == 50 and node.round_seed(7, 3) == node.round_seed(7, 3)
    check_commit_phase(SCHEDULE, 0, COMMIT_FIRST)
    check_commit_phase(SCHEDULE, 0, COMMIT_LAST)
    with pytest.raises(WrongPhase, match="round 1, train phase"):
        check_commit_phase(SCHEDULE, 0, SCHEDULE.round_length)
    check_reveal_phase(SCHEDULE, 0, COMMIT_LAST + 1)
    with pytest.raises(WrongPhase, match="not over"):
        check_reveal_phase(SCHEDULE, 0, COMMIT_LAST)
