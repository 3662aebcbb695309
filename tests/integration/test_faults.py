"""Faults (issue 6): a flaky chain RPC, and roles killed with SIGKILL in the middle of a step.

.venv/bin/python -m pytest -q tests/integration/test_faults.py

- Chain RPC dropping, failing (502), delaying or losing the answer to requests, through a real
  HTTP proxy (rpc_proxy.py) in front of anvil: EvmChain retries with backoff and every logical
  call spends exactly one nonce; a lost eth_sendRawTransaction answer is resolved by the hash.
- Roles as real processes (this file run as a script: `python test_faults.py ROLE CONFIG`)
  that kill themselves with SIGKILL at a hook inside a step, then restart: a miner during
  training and during the delta write, a validator during evaluation, a merger at each point
  of publishing. Chain state lives in anvil so it survives the process.

Blob server unreachable for one miner is covered by test_validator_node.py
(test_every_committer_gets_its_outcome: erin's artifact and frank's manifest are missing from
the validator's store -> outcome "unavailable", the others score normally).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # as a child script: conftest and rpc_proxy sit beside this file
    sys.path.insert(0, str(HERE))

from conftest import ROOT, rpc  # noqa: E402
from rpc_proxy import RpcProxy  # noqa: E402

from protocol.chain import ChainError  # noqa: E402
from protocol.round.context import RoleContext  # noqa: E402
from protocol.round.schedule import Schedule, phase_bounds  # noqa: E402


def _key(name: str) -> str:
    """A private key of our own per role, so no other test's nonces interleave with ours."""
    return "0x" + hashlib.sha256(f"moesaic-faults-{name}".encode()).hexdigest()


def _account(anvil_url: str, name: str):
    from eth_account import Account

    account = Account.from_key(_key(name))
    rpc(anvil_url, "anvil_setBalance", [account.address, hex(10**24)])
    return account


def _mine_to(anvil_url: str, block: int) -> None:
    """Mine so that the chain's head is at least `block` (no-op when it already is)."""
    head = int(rpc(anvil_url, "eth_blockNumber"), 16)
    if head < block:
        rpc(anvil_url, "anvil_mine", [hex(block - head)])


def _nonce(anvil_url: str, address: str) -> int:
    return int(rpc(anvil_url, "eth_getTransactionCount", [address, "latest"]), 16)


# ============================================================================ chain RPC faults


@pytest.fixture
def flaky(anvil_node, anvil_url, request):
    """A registry deployed directly; miners and a validator whose clients go through a proxy.

    The clients time out after 1 s (so a 3 s delay is a lost answer) and back off from 50 ms.
    """
    from protocol.chain.evm import EvmChain, connect, deploy_registry

    tag = request.node.name
    owner = _account(anvil_url, f"{tag}-owner")
    miners = [_account(anvil_url, f"{tag}-miner-{i}") for i in range(3)]
    validator = _account(anvil_url, f"{tag}-validator")
    schedule = Schedule(anvil_node.w3.eth.block_number + 10, 4, 10, 2, 2, 10, 4)
    registry = deploy_registry(anvil_node.w3, owner, schedule)
    direct = [EvmChain(anvil_node.w3, registry, a, timeout=30) for a in miners]
    for m in direct:
        m.register()
    EvmChain(anvil_node.w3, registry, owner).authorise_validator(validator.address)
    proxy = RpcProxy(anvil_url)
    w3 = connect(proxy.url, timeout=1.0)
    clients = [EvmChain(w3, registry, a, timeout=30, retries=4, backoff=0.05) for a in miners]
    val = EvmChain(w3, registry, validator, timeout=30, retries=4, backoff=0.05)
    try:
        yield dict(proxy=proxy, schedule=schedule, miners=clients, validator=val, registry=registry)
    finally:
        proxy.close()


def test_reads_retry_through_drops_502s_and_delays(flaky, anvil_url, caplog):
    proxy, chain = flaky["proxy"], flaky["validator"]
    head = int(rpc(anvil_url, "eth_blockNumber"), 16)
    proxy.fault("eth_blockNumber", "drop")
    proxy.fault("eth_blockNumber", "502")
    with caplog.at_level(logging.WARNING, logger="protocol.chain.evm"):
        assert chain.block() >= head
        proxy.fault("eth_call", "delay", delay=3.0)  # longer than the client's 1 s timeout
        proxy.fault("eth_call", "502", times=2)
        assert [m.uid for m in chain.members()] == [0, 1, 2, 3]
    assert proxy.pending() == []  # every fault was met, so every retry above was needed
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 5, retries  # each logged, with the error that caused it
    assert any("502" in m for m in retries) and any("Timeout" in m for m in retries)


def test_reads_give_up_after_bounded_retries(flaky):
    from protocol.chain.evm import EvmChain

    proxy = flaky["proxy"]
    chain = flaky["validator"]
    quick = EvmChain(chain.w3, flaky["registry"], retries=2, backoff=0.01)
    proxy.fault("*", "502", times=1000)
    started = time.monotonic()
    with pytest.raises(ChainError) as info:
        quick.block()
    assert info.value.code == "Unreachable" and "502" in str(info.value)
    assert time.monotonic() - started < 2.0  # 0.01 + 0.02 s of backoff, not a hang
    assert [m for m, _ in proxy.seen].count("eth_blockNumber") == 3  # 1 try + 2 retries


def test_commits_and_weights_land_once_despite_lost_requests_and_answers(flaky, anvil_url, caplog):
    proxy, schedule = flaky["proxy"], flaky["schedule"]
    miners, val = flaky["miners"], flaky["validator"]
    send = "eth_sendRawTransaction"
    _mine_to(anvil_url, phase_bounds(schedule, 0, "commit")[0] - 1)

    def once(chain, call):
        """Run call(); assert it spent exactly one nonce and every send carried one tx."""
        before, sent = _nonce(anvil_url, chain.address), len(proxy.raw_sent)
        result = call()
        assert _nonce(anvil_url, chain.address) == before + 1
        raws = set(proxy.raw_sent[sent:])
        assert len(raws) == 1, "a re-send must be the same signed bytes"
        assert proxy.pending() == [], proxy.pending()
        return result, len(proxy.raw_sent) - sent

    digests = [hashlib.sha256(f"manifest-{i}".encode()).hexdigest() for i in range(3)]
    with caplog.at_level(logging.INFO, logger="protocol.chain.evm"):
        # The request never reached the node (and reads on the way fail too): sent again.
        proxy.fault("eth_estimateGas", "502")
        proxy.fault("eth_getTransactionCount", "drop")
        proxy.fault(send, "drop")
        _, sends = once(miners[0], lambda: miners[0].commit(0, digests[0]))
        assert sends == 2 and proxy.forwarded(send) == 1
        # The node mined it, the answer was lost: found by its hash, not sent again.
        proxy.fault(send, "lose_answer")
        _, sends = once(miners[1], lambda: miners[1].commit(0, digests[1]))
        assert sends == 1
        # Answered after the client gave up: re-sent while the first is still in flight; the
        # node runs one of the two identical transactions and refuses the other.
        proxy.fault(send, "delay", delay=3.0)
        _, sends = once(miners[2], lambda: miners[2].commit(0, digests[2]))
        assert sends == 2
        # Lost answer, then a lagging backend that has not seen the transaction: the client
        # re-sends the same bytes, the node says "nonce too low", and the hash resolves it.
        vote = ([0, 1, 2], [1.0, 0.5, 0.25], bytes(32))
        _mine_to(anvil_url, phase_bounds(schedule, 0, "evaluate")[0] - 1)
        val.commit_weights(0, *vote)
        _mine_to(anvil_url, phase_bounds(schedule, 0, "weights")[0] - 1)
        proxy.fault(send, "lose_answer")
        proxy.fault("eth_getTransactionReceipt", "stale")
        proxy.fault("eth_getTransactionByHash", "stale")
        block, sends = once(val, lambda: val.set_weights(0, *vote))
        assert sends == 2
    assert "node already has" in caplog.text and "nonce too low" in caplog.text.lower()
    time.sleep(3.5)  # let the delayed request reach the node: it must not land a second time
    assert _nonce(anvil_url, miners[2].address) == 1 + 1  # register + one commit
    commitments = val.commitments(0)
    assert [(c.hotkey, c.digest) for c in commitments] == [
        (m.address, d) for m, d in zip(miners, digests, strict=True)
    ]
    assert val.weights(0) == {3: {0: 65535, 1: 32768, 2: 16384}}
    assert phase_bounds(schedule, 0, "weights")[0] == block


def test_a_nonce_taken_by_another_transaction_is_reported_not_waited_for(anvil_node, anvil_url):
    """The node says "nonce too low" and our hash is unknown: another transaction took the
    nonce (a second process with the same key), so ours can never land."""
    from protocol.chain.evm import _land

    account = _account(anvil_url, "nonce-race")
    nonce = _nonce(anvil_url, account.address)
    # Above the base fee, whatever earlier tests on this session's anvil pushed it to: an
    # underpriced transaction would wait in the pool and take no nonce.
    price = 2 * anvil_node.w3.eth.gas_price + 10**10
    tx = dict(to=account.address, value=1, gas=21_000, gasPrice=price, chainId=31337)
    ours = account.sign_transaction({**tx, "nonce": nonce})
    other = account.sign_transaction({**tx, "nonce": nonce, "value": 2})
    anvil_node.w3.eth.send_raw_transaction(other.raw_transaction)
    with pytest.raises(ChainError) as info:
        _land(anvil_node.w3, ours, nonce, account.address, 10.0, 2, 0.01)
    assert info.value.code == "NonceUsed", info.value
    # Anvil automines asynchronously: after a busy session the other transaction may still sit
    # in the pool (the node then answers "replacement transaction underpriced", also NonceUsed).
    anvil_node.w3.eth.wait_for_transaction_receipt(other.hash, timeout=30)
    assert _nonce(anvil_url, account.address) == nonce + 1


# ============================================================================ roles killed


ROUND, TASK = 1, 0
# Blocks only move when a transaction or anvil_mine makes them, so phases are long enough for
# every transaction of the tests and short enough to mine through.
PHASES = dict(train=2, commit=12, reveal=1, evaluate=4, weights=12, merge=30)
EVAL = dict(domain_batches=24, general_batches=24, seq_len=64, batch_size=4, max_tokens=20_000)
MINERS = ("alice", "bob", "carol")  # two honest deltas and one of noise
MINER_TRAIN = dict(steps=6, lr=1e-2, batch_size=4, seq_len=64, max_tokens=20_000)


def _role(role: str, config: dict, tmp: Path, fault: str = "") -> subprocess.CompletedProcess:
    """Run this file as a `role` process on `config`; MOESAIC_FAULT names its kill point."""
    path = tmp / f"{role}-{len(list(tmp.glob(f'{role}-*.json')))}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "MOESAIC_FAULT": fault}
    cmd = [sys.executable, str(Path(__file__).resolve()), role, str(path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{role} {fault or 'clean'} exited {done.returncode}:\n{done.stderr}")
    return done


def _killed(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == -signal.SIGKILL


def _visible(folder: Path) -> list[str]:
    """Entries a reader would take for results (temp files and dirs start with a dot)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------- the miner


@pytest.mark.slow
def test_miner_killed_mid_training_resumes_with_a_valid_delta(test_base, test_assignment, tmp_path):
    from miner.node import Miner, TrainSettings
    from protocol.artifact.delta import max_delta_bytes
    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.chain.fake import FakeChain, FakeLedger
    from protocol.identity.hashing import sha256_dir, sha256_file
    from protocol.identity.keys import EthSigner
    from protocol.moe.experts import Assignment
    from protocol.moe.model import expert_layout, load_model
    from protocol.storage.file import FileStore

    work, store = tmp_path / "miner", tmp_path / "store"
    config = dict(base=str(test_base), assignment=str(test_assignment), work=str(work))
    config.update(store=str(store), key=_key("miner"))
    delta, state = work / "rounds" / "0.delta.safetensors", work / "rounds" / "0.json"

    # Killed after 3 of 6 optimizer steps: nothing of the round is on disk as a result.
    assert _killed(_role("miner", config, tmp_path, "train_step:3"))
    assert not delta.exists()
    assert not state.exists() or json.loads(state.read_text()).get("trained") is None
    # Killed while the finished delta is being written (after the bytes, before the rename).
    assert _killed(_role("miner", config, tmp_path, "delta_fsync"))
    assert _visible(work / "rounds") in ([], ["0.json"]), _visible(work / "rounds")
    # Restarted (here, in this process): trains again, commits and then reveals the round.
    ledger = FakeLedger(Schedule())
    signer = EthSigner(_key("miner"))
    chain = FakeChain(ledger, signer.identity)
    chain.register()
    ctx = RoleContext(
        chain,
        FileStore(store),
        schedule=Schedule(),
        chain_label="evm:31337:0x" + "ab" * 20,
        task_id=0,
        base_dir=test_base,
        assignment_path=test_assignment,
        signer=signer,
    )
    miner = Miner(
        ctx,
        data_spec="corpus:math",
        work_dir=work,
        train=TrainSettings(**MINER_TRAIN),
        quiet=True,
    )
    summary = miner.run_round(0, ledger.mine_to)
    assert [c.digest for c in chain.commitments(0)] == [summary["manifest_digest"]]
    assert sha256_file(delta) == summary["delta_sha256"]
    assignment = Assignment.load(test_assignment)
    layout = expert_layout(load_model(test_base))
    meta, tensors = read_delta_untrusted(
        delta,
        layout=layout,
        assignment=assignment,
        max_bytes=max_delta_bytes(layout, assignment),
        expected_base_hash=sha256_dir(test_base),
        expected_round=0,
        expected_sha256=summary["delta_sha256"],
    )
    assert tensors and meta.round == 0
    # What a crash may leave behind is hidden temp files, never a visible partial artifact.
    leftovers = [p.name for p in (work / "rounds").iterdir() if p.name.startswith(".")]
    assert all(n.endswith(".tmp") for n in leftovers), leftovers


# ---------------------------------------------------------------------------- validator, merger


@pytest.fixture(scope="module")
def net(anvil_node, anvil_url, tmp_path_factory, test_base, test_assignment, train_honest):
    """A registry on anvil with round ROUND's three commitments in a file store, and a
    previous checkpoint (round ROUND - 1: the base itself) published by the merger."""
    from safetensors import safe_open
    from shard_files import declaring_shard
    from test_validator_node import _noise

    from protocol.artifact.checkpoint import publish_dir
    from protocol.artifact.delta import METADATA_KEY, DeltaMeta
    from protocol.chain.evm import EvmChain, deploy_registry
    from protocol.identity.keys import EthSigner
    from protocol.round.manifest import evm_chain, manifest_for, sign
    from protocol.storage.file import FileStore

    work = tmp_path_factory.mktemp("faults")
    honest = train_honest(work, ROUND)
    deltas = dict(alice=honest[0], bob=honest[1], carol=_noise(work, "carol", honest[0], 7))
    w3 = anvil_node.w3
    names = ("owner", *MINERS, "val-a", "val-b", "merger")
    acct = {n: _account(anvil_url, f"net-{n}") for n in names}
    schedule = Schedule(w3.eth.block_number + 20, **PHASES)
    registry = deploy_registry(w3, acct["owner"], schedule)
    chain = {n: EvmChain(w3, registry, a, timeout=60) for n, a in acct.items()}
    for name in MINERS:
        chain[name].register()
    for name in ("val-a", "val-b"):
        chain["owner"].authorise_validator(acct[name].address)
    chain["owner"].set_merger(acct["merger"].address)
    assert w3.eth.block_number < schedule.start_block, "setup took more blocks than planned"

    store = FileStore(work / "store")
    _mine_to(anvil_url, phase_bounds(schedule, ROUND - 1, "merge")[0])
    digest, uri, _ = publish_dir(store, test_base)
    chain["merger"].publish_checkpoint(ROUND - 1, digest, uri, "0" * 64)

    label = evm_chain(w3.eth.chain_id, registry)
    _mine_to(anvil_url, phase_bounds(schedule, ROUND, "commit")[0] - 1)
    for name in MINERS:
        key = EthSigner(_key(f"net-{name}"))
        mine = declaring_shard(deltas[name], TASK, key.identity, work / f"{name}.delta.safetensors")
        ref = store.put(mine, name=f"{name}.safetensors")
        with safe_open(str(mine), "pt") as f:  # trusted: the test wrote it
            meta = DeltaMeta.from_json(f.metadata()[METADATA_KEY])
        signed = sign(manifest_for(meta, ref, chain=label, task_id=TASK, hotkey=key.identity), key)
        (work / f"{name}.manifest.json").write_text(signed.to_json())
        store.put(work / f"{name}.manifest.json")
        chain[name].commit(ROUND, signed.commitment_digest())
    common = dict(
        rpc=anvil_url,
        registry=registry,
        store=str(work / "store"),
        label=label,
        base=str(test_base),
        assignment=str(test_assignment),
        schedule=[schedule.start_block, *schedule.lengths],
    )
    return dict(
        work=work,
        chain=chain,
        acct=acct,
        schedule=schedule,
        common=common,
        previous=(digest, uri),
        registry=registry,
    )


@pytest.fixture(scope="module")
def validated(net):
    """Validator A runs the round through; validator B is SIGKILLed while evaluating (after
    the first of three deltas), then restarted as a new process on the same state dir."""
    work, common = net["work"], net["common"]
    config = lambda name: {  # noqa: E731
        **common,
        "key": _key(f"net-{name}"),
        "state": str(work / name),
    }
    # Both commit their weights in the evaluate phase (processes run one after another here),
    # then both reveal in the weights phase.
    a = _role("validator", {**config("val-a"), "commit_only": True}, work)
    killed = _role("validator", {**config("val-b"), "commit_only": True}, work, "evaluate:2")
    after_kill = json.loads((work / "val-b" / "rounds" / f"{ROUND}.json").read_text())
    restarted = _role("validator", {**config("val-b"), "commit_only": True}, work)
    for name in ("val-a", "val-b"):
        assert _role("validator", config(name), work).returncode == 0
    return dict(a=a, killed=killed, after_kill=after_kill, restarted=restarted)


@pytest.mark.slow
def test_validator_killed_during_evaluation_writes_the_same_weights(net, validated):
    assert validated["a"].returncode == 0 and validated["restarted"].returncode == 0
    assert _killed(validated["killed"])
    assert "fetch" in validated["after_kill"] and "evaluate" not in validated["after_kill"]
    work = net["work"]
    states = {
        n: json.loads((work / n / "rounds" / f"{ROUND}.json").read_text())
        for n in ("val-a", "val-b")
    }
    for step in ("collect", "fetch", "evaluate", "score"):
        assert states["val-a"][step] == states["val-b"][step], step
    outcomes = states["val-a"]["evaluate"]["outcomes"]
    assert len(outcomes) == 3
    uid = states["val-a"]["score"]["uids"]
    on_chain = net["chain"]["owner"].weights(ROUND)
    a, b = (uid[net["acct"][n].address] for n in ("val-a", "val-b"))
    assert on_chain[a] == on_chain[b] and on_chain[a]
    assert states["val-b"]["set_weights"]["status"] == "sent"


@pytest.mark.slow
def test_merger_killed_while_publishing_keeps_the_previous_checkpoint(net, validated, tmp_path):
    from moesaic.cli import main
    from protocol.identity.hashing import sha256_dir

    work, owner = net["work"], net["chain"]["owner"]
    config = {**net["common"], "key": _key("net-merger"), "state": str(work / "merger")}
    out = work / "merger" / "checkpoints"
    pull = ["checkpoint", "pull", "--rpc", config["rpc"], "--registry", net["registry"]]
    installed = None
    for n, point in enumerate(("export_mid", "export_done", "uploaded", "before_chain")):
        assert _killed(_role("merger", config, tmp_path, point)), point
        # Still the previous checkpoint on chain, and it pulls verified (the newest round).
        only = owner.latest_checkpoint()
        assert (only.round, only.digest, only.uri) == (ROUND - 1, *net["previous"])
        assert main([*pull, "--out", str(tmp_path / f"pull-{n}"), "--quiet"]) == 0
        assert sha256_dir(tmp_path / f"pull-{n}") == only.digest
        # The export appears whole (renamed into place) or not at all.
        if point == "export_mid":
            assert _visible(out) == []
        else:
            assert _visible(out) == [str(ROUND)]
            installed = installed or sha256_dir(out / str(ROUND))
            assert sha256_dir(out / str(ROUND)) == installed
    # Killed right after the transaction: it is on chain once, and a restart records it.
    assert _killed(_role("merger", config, tmp_path, "after_chain"))
    assert _role("merger", config, tmp_path).returncode == 0
    previous, published = owner.latest_checkpoint(before_round=ROUND), owner.latest_checkpoint()
    assert previous.round == ROUND - 1 and published.round == ROUND
    assert published.digest == installed
    record = json.loads((work / "merger" / "rounds" / f"{ROUND}.json").read_text())
    assert record["publish"]["status"] == "already_on_chain"
    assert record["publish"]["digest"] == published.digest
    assert main([*pull, "--out", str(tmp_path / "pull-new"), "--quiet"]) == 0
    assert sha256_dir(tmp_path / "pull-new") == published.digest
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(n.endswith(".tmp") for n in hidden), hidden


# ============================================================================ child processes


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_fault(fault: str) -> None:
    """Arm the kill point MOESAIC_FAULT names, by wrapping the real function at that point."""
    if not fault:
        return
    name, _, arg = fault.partition(":")
    if name == "train_step":  # after N optimizer steps
        from torch.optim.optimizer import register_optimizer_step_post_hook

        steps = [0]

        def after_step(*_):
            steps[0] += 1
            if steps[0] == int(arg):
                _die()

        register_optimizer_step_post_hook(after_step)
    elif name == "delta_fsync":  # the delta's bytes are in its temp file, not yet renamed
        real_fsync = os.fsync

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if ".delta.safetensors." in target and target.endswith(".tmp"):
                _die()
            real_fsync(fd)

        os.fsync = fsync
    elif name == "evaluate":  # when the N-th delta's evaluation starts
        from protocol.moe.evaluate import Evaluator

        real, calls = Evaluator.evaluate, [0]

        def evaluate(self, tensors):
            calls[0] += 1
            if calls[0] == int(arg):
                _die()
            return real(self, tensors)

        Evaluator.evaluate = evaluate
    elif name == "export_mid":  # files written into the temp dir, not yet renamed into place
        import protocol.artifact.export

        protocol.artifact.export.fsync_tree = lambda root: _die()
    elif name == "export_done":
        import protocol.artifact.export

        real_export = protocol.artifact.export.export_checkpoint
        protocol.artifact.export.export_checkpoint = lambda *a, **k: (real_export(*a, **k), _die())
    elif name == "uploaded":  # every object in the store, nothing on chain
        import protocol.artifact.checkpoint

        real_publish = protocol.artifact.checkpoint.publish_dir
        protocol.artifact.checkpoint.publish_dir = lambda *a, **k: (real_publish(*a, **k), _die())[
            0
        ]
    elif name in ("before_chain", "after_chain"):
        from protocol.chain.evm import EvmChain

        real_send = EvmChain.publish_checkpoint

        def publish_checkpoint(self, *args):
            if name == "before_chain":
                _die()
            real_send(self, *args)
            _die()

        EvmChain.publish_checkpoint = publish_checkpoint
    else:
        raise SystemExit(f"unknown MOESAIC_FAULT {fault!r}")


def _child(role: str, config_path: str) -> int:
    """One role process: `python test_faults.py miner|validator|merger CONFIG.json`."""
    from protocol.chain.evm import EvmChain, load_account
    from protocol.storage.file import FileStore

    c = json.loads(Path(config_path).read_text())
    _install_fault(os.environ.get("MOESAIC_FAULT", ""))
    if role == "miner":
        from miner.node import Miner, TrainSettings
        from protocol.chain.fake import FakeChain, FakeLedger
        from protocol.identity.keys import EthSigner

        signer = EthSigner(c["key"])
        ctx = RoleContext(
            FakeChain(FakeLedger(Schedule()), signer.identity),
            FileStore(c["store"]),
            schedule=Schedule(),
            chain_label="evm:31337:0x" + "ab" * 20,
            task_id=0,
            base_dir=c["base"],
            assignment_path=c["assignment"],
            signer=signer,
        )
        Miner(
            ctx,
            data_spec="corpus:math",
            work_dir=c["work"],
            train=TrainSettings(**MINER_TRAIN),
            quiet=True,
        ).train(0)
        return 0
    chain = EvmChain(c["rpc"], c["registry"], load_account(key=c["key"]), timeout=60)
    ctx = RoleContext(
        chain,
        FileStore(c["store"]),
        schedule=Schedule(c["schedule"][0], *c["schedule"][1:]),
        chain_label=c["label"],
        task_id=TASK,
        base_dir=c["base"],
        assignment_path=c["assignment"],
    )
    common = dict(
        domain_spec="corpus:math",
        general_specs=["corpus:prose", "corpus:code"],
        state_dir=c["state"],
    )
    wait = lambda block: _mine_to(c["rpc"], block)  # noqa: E731  (tests move the clock)
    if role == "validator":
        from protocol.settings import EvalSettings
        from validator.node import Validator, ValidatorSettings

        settings = ValidatorSettings(
            EvalSettings(**EVAL, general_tolerance=0.05, max_artifact_bytes=8 << 20), ema_alpha=0.5
        )
        v = Validator(ctx, settings=settings, **common)
        if not c.get("commit_only"):
            v.run_round(ROUND, wait)  # finished steps return their records
            return 0
        wait(phase_bounds(ctx.schedule, ROUND, "evaluate")[0])  # miners reveal until then
        for step in (v.collect, v.fetch, v.evaluate, v.score, v.weights_salt):
            step(ROUND)
        v.commit_weights(ROUND)
    elif role == "merger":
        from merger.node import Merger, MergerSettings
        from protocol.settings import EvalSettings

        settings = MergerSettings(EvalSettings(**EVAL, max_artifact_bytes=8 << 20))
        Merger(ctx, settings=settings, **common).run_round(ROUND, wait)
    return 0


if __name__ == "__main__":
    from protocol.ops.logs import quiet_third_party

    logging.basicConfig(level=logging.INFO)
    quiet_third_party()
    sys.exit(_child(sys.argv[1], sys.argv[2]))
