"""One round of the whole network, every role its own `moesaic ... run` process, on anvil.

.venv/bin/python -m pytest -q tests/integration/test_roles_run.py

Two miners, one validator and one merger run `--set run.rounds=1` from TOML configs against a
freshly deployed registry on anvil and a blob server that accepts the miners' and the merger's
keys. Anvil automines one block per transaction, so a thread here mines one block every
BLOCK_S seconds while the processes run (the phases are counted in blocks). Afterwards: both
miners committed, the validator set weights with both honest miners above zero, the merger
published a checkpoint (or recorded why it kept the previous one) and `moesaic checkpoint pull`
fetches what was published.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import rpc, stop
from storage_fixtures import ROOT, running_blob_server

from moesaic.cli import main
from protocol.round.schedule import Schedule, phase_bounds

BLOCK_S = 0.5
# Blocks before round 0 starts: the setup transactions below mine about 8 of them.
LEAD = 20
# Miners upload in the reveal phase: 4 blocks (2 s) for a ~40 KB delta on 127.0.0.1 while
# the other processes load models on 2 cores. The validator evaluates and commits its weights'
# hash within the evaluate phase, then only reveals them in the weights phase: the room for
# evaluation is in the evaluate phase. The registry takes the checkpoint only in the merge
# phase: the room for merging is there.
PHASES = dict(train=30, commit=20, reveal=4, evaluate=34, weights=8, merge=80)
MINER_SEEDS = (0, 1)
EVAL = """domain_batches = 24
general_batches = 24
seq_len = 64
batch_size = 4
max_tokens = 20_000
general_tolerance = 0.05
max_artifact_bytes = 8_388_608
device = "cpu"
"""


def _config(path: Path, *, rpc_url, registry, key, store, base, assignment, section) -> Path:
    path.write_text(
        f"""[chain]
rpc = "{rpc_url}"
registry = "{registry}"
key_file = "{key}"

[store]
uri = "{store}"

[task]
task_id = 0
base_dir = "{base}"
assignment = "{assignment}"
domain = "corpus:math"
general = ["corpus:prose", "corpus:code"]

[run]
poll_s = 0.3

{section}"""
    )
    return path


class Miner(threading.Thread):
    """Mines one block every BLOCK_S seconds until stopped."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stopped = url, threading.Event()

    def run(self):
        while not self.stopped.wait(BLOCK_S):
            with contextlib.suppress(Exception):  # a slow answer must not end the clock
                rpc(self.url, "anvil_mine", ["0x1"])


@pytest.mark.slow
def test_one_round_of_every_role_as_processes(tmp_path, anvil_url, anvil_node, capsys):
    from protocol.chain.evm import EvmChain, deploy_registry
    from protocol.identity.hashing import sha256_dir
    from protocol.identity.keys import load_signer
    from protocol.moe.experts import Assignment

    started = time.monotonic()
    base, assignment = tmp_path / "base", tmp_path / "math.json"
    assert main(["base", "build", "--preset", "test", "--out", str(base), "--quiet"]) == 0
    args = ["experts", "select", "--model", str(base), "--data", "corpus:math"]
    args += ["--method", "token-ratio", "--p", "0.3", "--tokens", "8192", "--seq-len", "64"]
    assert main([*args, "--out", str(assignment), "--quiet"]) == 0

    w3, accounts = anvil_node.w3, anvil_node.accounts
    owner, miners, validator, merger = accounts[0], accounts[1:3], accounts[3], accounts[4]
    schedule = Schedule(start_block=w3.eth.block_number + LEAD, **PHASES)
    registry = deploy_registry(w3, owner, schedule)
    admin = EvmChain(w3, registry, owner)
    for account in [*miners, validator]:
        EvmChain(w3, registry, account).register()
    admin.authorise_validator(validator.address)
    admin.set_merger(merger.address)
    admin.publish_task(
        sha256_dir(base), Assignment.load(assignment).hash(), "00" * 32, "corpus:math"
    )
    assert w3.eth.block_number < schedule.start_block, "setup took longer than LEAD blocks"

    keys = {"miner0": miners[0], "miner1": miners[1], "validator": validator, "merger": merger}
    key_files = {}
    for name, account in keys.items():
        key_files[name] = tmp_path / f"{name}.key"
        key_files[name].write_text("0x" + account.key.hex().removeprefix("0x") + "\n")
        key_files[name].chmod(0o600)  # a key file other users may read is refused
    allow = [load_signer(key_files[n].read_text().strip()).identity for n in ("miner0", "miner1")]
    allow.append(load_signer(key_files["merger"].read_text().strip()).identity)

    logs: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen] = {}
    clock = Miner(anvil_url)
    with running_blob_server(tmp_path / "blobs", allow=allow) as server:
        common = dict(
            rpc_url=anvil_url, registry=registry, store=server.url, base=base,
            assignment=assignment,
        )  # fmt: skip
        sections = {
            f"miner{i}": (
                "miner",
                f'[miner]\nwork_dir = "{tmp_path / f"miner{i}"}"\n\n[miner.train]\nsteps = 16\n'
                f"lr = 1e-2\nbatch_size = 4\nseq_len = 64\nmax_tokens = 20_000\nseed = {seed}\n"
                'device = "cpu"\n',
            )
            for i, seed in enumerate(MINER_SEEDS)
        }
        sections["validator"] = (
            "validator",
            f'[validator]\nstate_dir = "{tmp_path / "validator"}"\nema_alpha = 0.5\n{EVAL}',
        )
        sections["merger"] = ("merger", f'[merger]\nstate_dir = "{tmp_path / "merger"}"\n{EVAL}')
        # Four torch processes share the machine's cores with a wall-clock block producer: with
        # torch's default pool (one thread per core) each, their OpenMP threads spin against
        # each other and a 20 ms training step takes ~1.8 s, so miners miss the commit phase.
        # One thread each is what a shared box needs (a real miner has its own GPU box).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        clock.start()
        try:
            for name, (role, section) in sections.items():
                config = _config(
                    tmp_path / f"{name}.toml", key=key_files[name], section=section, **common
                )
                logs[name] = tmp_path / f"{name}.log"
                cmd = [sys.executable, "-m", "moesaic", role, "run", "--config", str(config)]
                cmd += ["--set", "run.rounds=1"]
                with logs[name].open("wb") as out:
                    procs[name] = subprocess.Popen(
                        cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                        start_new_session=True,
                    )  # fmt: skip
            merge_start = phase_bounds(schedule, 0, "merge")[0]
            deadline = time.monotonic() + (merge_start - w3.eth.block_number) * BLOCK_S + 90
            failed = None
            while time.monotonic() < deadline:
                codes = {n: p.poll() for n, p in procs.items()}
                if any(c not in (None, 0) for c in codes.values()):
                    failed = f"exit codes {codes}"
                    break
                if all(c == 0 for c in codes.values()):
                    break
                time.sleep(0.5)
            else:
                running = [n for n, p in procs.items() if p.poll() is None]
                failed = f"still running after the deadline: {running}"
            if failed:
                for name, path in logs.items():
                    print(f"----- {name} -----\n{path.read_text()[-6000:]}")
                pytest.fail(f"{failed}; block {w3.eth.block_number}, schedule {schedule}")
        finally:
            clock.stopped.set()
            clock.join(timeout=5)
            for proc in procs.values():
                stop(proc)

        for name, path in logs.items():
            print(f"----- {name} -----\n{path.read_text()[-3000:]}")
        reader = EvmChain(w3, registry)
        uids = {reader.uid_of(a.address) for a in miners}
        assert {reader.uid_of(c.hotkey) for c in reader.commitments(0)} == uids

        weights = reader.weights(0)
        assert list(weights) == [reader.uid_of(validator.address)], weights
        (held,) = weights.values()
        assert main(["validator", "explain", "--round", "0", "--state-dir",
                     str(tmp_path / "validator")]) == 0  # fmt: skip
        explained = capsys.readouterr().out
        print(explained)
        assert all(held.get(uid, 0) > 0 for uid in uids), (held, explained)

        record = json.loads((tmp_path / "merger" / "rounds" / "0.json").read_text())
        checkpoint = reader.checkpoint(0)
        if record["publish"]["status"] == "sent":
            assert checkpoint.round == 0 and checkpoint.publisher == merger.address
            out = tmp_path / "pulled"
            pull = ["checkpoint", "pull", "--rpc", anvil_url, "--registry", registry]
            assert main([*pull, "--round", "0", "--out", str(out), "--quiet"]) == 0
            assert sha256_dir(out) == checkpoint.digest
        else:  # the guard kept the previous checkpoint: it must say why, and publish nothing
            assert record["publish"]["status"] == "nothing_published", record["publish"]
            assert record["merge"]["reason"], record["merge"]
            assert checkpoint is None and reader.latest_checkpoint() is None
    assert time.monotonic() - started < 240
