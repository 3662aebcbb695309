"""An in-memory chain for unit tests, with the registry contract's rules and error codes.

Not a backend to run a network on: it exists so role logic can be unit-tested in milliseconds.
`tests/integration/test_chain_conformance.py` runs the same scenario on this fake and on the
real backends, so its behaviour cannot drift from theirs. Like anvil's automine, every
state-changing call is mined into its own block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from protocol.chain import ChainError, Checkpoint, Commitment, Member, Task, u16_weights
from protocol.round.schedule import PHASES, Schedule, position


@dataclass
class FakeLedger:
    """The shared chain state; each `FakeChain` is one key's view of it."""

    schedule: Schedule
    owner: str = "owner"
    min_bond: int = 0
    height: int = 0
    members: dict[str, dict] = field(
        default_factory=dict
    )  # address -> {uid, bond, miner, validator}
    commitments: dict[int, list[Commitment]] = field(default_factory=dict)
    weights: dict[int, dict[int, dict[int, int]]] = field(default_factory=dict)
    weight_commitments: dict[int, dict[str, str]] = field(default_factory=dict)  # round, address
    checkpoints: list[Checkpoint] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    mergers: set[str] = field(default_factory=set)
    label: str = "fake:0"  # the deployment manifests name (protocol.round.manifest's rule)

    def mine(self, blocks: int = 1) -> None:
        self.height += blocks

    def mine_to(self, block: int) -> None:
        self.height = max(self.height, block)

    def tx(self) -> int:
        """A transaction lands in the next block (automine)."""
        self.height += 1
        return self.height

    def require_phase(self, rnd: int, phase: str, block: int) -> None:
        pos = position(self.schedule, block)
        cur_round, cur_phase = (pos.round, PHASES.index(pos.phase)) if pos else (0, 255)
        if not pos or pos.round != rnd or pos.phase != phase:
            raise ChainError(
                "WrongPhase",
                f"round={rnd}, expected={phase}, currentRound={cur_round}, currentPhase={cur_phase}",
            )

    def uid_of(self, address: str) -> int | None:
        m = self.members.get(address)
        return None if m is None else m["uid"]

    def allocate(self, address: str) -> int:
        used = {m["uid"] for m in self.members.values()}
        uid = next(i for i in range(len(used) + 1) if i not in used)
        self.members[address] = {"uid": uid, "bond": 0, "miner": False, "validator": False}
        return uid


class FakeChain:
    """One key's client of a `FakeLedger`, implementing the `Chain` protocol."""

    def __init__(self, ledger: FakeLedger, address: str):
        self.ledger, self.address = ledger, address

    # -- reads ------------------------------------------------------------------------------
    def block(self) -> int:
        return self.ledger.height

    def block_hash(self, block: int) -> str:
        if block > self.ledger.height or block < 0:
            raise ChainError("UnknownBlock", f"block {block} does not exist yet")
        return "0x" + hashlib.sha256(f"fake-block-{block}".encode()).hexdigest()

    def members(self) -> list[Member]:
        rows = sorted(self.ledger.members.items(), key=lambda kv: kv[1]["uid"])
        return [Member(m["uid"], a, m["bond"] / 1e18, m["validator"]) for a, m in rows]

    def commitments(self, round: int) -> list[Commitment]:
        return list(self.ledger.commitments.get(round, []))

    def weights(self, round: int) -> dict[int, dict[int, int]]:
        return {v: dict(w) for v, w in self.ledger.weights.get(round, {}).items()}

    def checkpoint(self, round: int) -> Checkpoint | None:
        return next((c for c in self.ledger.checkpoints if c.round == round), None)

    def latest_checkpoint(self, before_round: int | None = None) -> Checkpoint | None:
        earlier = [
            c for c in self.ledger.checkpoints if before_round is None or c.round < before_round
        ]
        return max(earlier, key=lambda c: c.round, default=None)

    def weight_commitment(self, round: int, hotkey: str) -> str | None:
        return self.ledger.weight_commitments.get(round, {}).get(hotkey)

    def schedule(self) -> Schedule:
        return self.ledger.schedule

    def label(self) -> str:
        return self.ledger.label

    def identity(self) -> str | None:
        return self.address

    def task(self) -> Task:
        if not self.ledger.tasks:
            raise ChainError("NoTask", "no task has been published")
        return self.ledger.tasks[-1]

    # -- writes -----------------------------------------------------------------------------
    def register(self, bond: int | None = None) -> int:
        bond = self.ledger.min_bond if bond is None else bond
        if bond < self.ledger.min_bond:
            raise ChainError("InsufficientBond", f"sent={bond}, required={self.ledger.min_bond}")
        m = self.ledger.members.get(self.address)
        if m and m["miner"]:
            raise ChainError("AlreadyRegistered", f"account={self.address}, uid={m['uid']}")
        self.ledger.tx()
        uid = m["uid"] if m else self.ledger.allocate(self.address)
        self.ledger.members[self.address].update(miner=True, bond=bond)
        return uid

    def _owner_only(self) -> None:
        if self.address != self.ledger.owner:
            raise ChainError("NotOwner", f"caller={self.address}")

    def authorise_validator(self, address: str, allowed: bool = True) -> int:
        self._owner_only()
        if allowed and address not in self.ledger.members:
            self.ledger.allocate(address)
        if address in self.ledger.members:
            self.ledger.members[address]["validator"] = allowed
        return self.ledger.tx()

    def set_merger(self, address: str, allowed: bool = True) -> int:
        self._owner_only()
        (self.ledger.mergers.add if allowed else self.ledger.mergers.discard)(address)
        return self.ledger.tx()

    def publish_task(self, base_hash: str, assignment_hash: str, data_hash: str, uri: str) -> int:
        self._owner_only()
        self.ledger.tasks.append(
            Task(len(self.ledger.tasks), base_hash, assignment_hash, data_hash, uri)
        )
        self.ledger.tx()
        return len(self.ledger.tasks) - 1

    def commit(self, round: int, digest: str) -> int:
        m = self.ledger.members.get(self.address)
        if not m or not m["miner"]:
            raise ChainError("NotRegistered", f"account={self.address}")
        block = self.ledger.height + 1
        self.ledger.require_phase(round, "commit", block)
        if any(c.hotkey == self.address for c in self.ledger.commitments.get(round, [])):
            raise ChainError("AlreadyCommitted", f"round={round}, miner={self.address}")
        self.ledger.tx()
        self.ledger.commitments.setdefault(round, []).append(
            Commitment(self.address, round, digest, block)
        )
        return block

    def _validator(self) -> dict:
        m = self.ledger.members.get(self.address)
        if not m or not m["validator"]:
            raise ChainError("NotValidator", f"account={self.address}")
        return m

    def _weights_hash(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> str:
        """This fake's own hash over (round, sender, u16 uids and values, salt)."""
        dests, values = u16_weights(uids, weights)
        text = repr((round, self.address, dests, values, bytes(salt).hex()))
        return hashlib.sha256(text.encode()).hexdigest()

    def commit_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        self._validator()
        block = self.ledger.height + 1
        self.ledger.require_phase(round, "evaluate", block)
        held = self.ledger.weight_commitments.setdefault(round, {})
        if self.address in held:
            raise ChainError("AlreadyCommittedWeights", f"round={round}, validator={self.address}")
        digest = self._weights_hash(round, uids, weights, salt)
        self.ledger.tx()
        held[self.address] = digest
        return block

    def set_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        m = self._validator()
        block = self.ledger.height + 1
        self.ledger.require_phase(round, "weights", block)
        if m["uid"] in self.ledger.weights.get(round, {}):
            raise ChainError("AlreadySetWeights", f"round={round}, validator={self.address}")
        committed = self.ledger.weight_commitments.get(round, {}).get(self.address)
        if committed is None:
            raise ChainError("NoWeightCommitment", f"round={round}, validator={self.address}")
        if self._weights_hash(round, uids, weights, salt) != committed:
            raise ChainError("WeightsMismatch", f"round={round}, validator={self.address}")
        valid = {x["uid"] for x in self.ledger.members.values()}
        for u in uids:
            if u not in valid:
                raise ChainError("InvalidUid", f"uid={u}")
        dests, values = u16_weights(uids, weights)
        self.ledger.tx()
        self.ledger.weights.setdefault(round, {})[m["uid"]] = dict(zip(dests, values, strict=True))
        return block

    def publish_checkpoint(self, round: int, digest: str, uri: str, deltas_digest: str) -> int:
        if self.address != self.ledger.owner and self.address not in self.ledger.mergers:
            raise ChainError("NotMerger", f"account={self.address}")
        block = self.ledger.height + 1
        self.ledger.require_phase(round, "merge", block)
        if any(c.round == round for c in self.ledger.checkpoints):
            raise ChainError("AlreadyPublished", f"round={round}")
        self.ledger.tx()
        self.ledger.checkpoints.append(
            Checkpoint(round, digest, uri, deltas_digest, block, self.address)
        )
        return block
