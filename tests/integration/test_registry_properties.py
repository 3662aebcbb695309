"""Property tests of MoesaicRegistry: random call sequences against a pure Python model.

Hypothesis draws sequences of register / deregister / commit / commit_weights / set_weights /
publish_checkpoint / setValidator / setMerger calls by random actors (the owner among them),
with mined blocks in between, and runs them through `EvmChain` on the in-process py-evm node
against a freshly deployed registry. A small model of the contract's rules predicts every
call's outcome (success and the block it lands in, or the custom error's name), and the chain
must agree call by call. After each sequence the chain's whole state is read back and checked
against the model and against the invariants themselves, derived from the recorded history
rather than from the model's rule code:

- no address that was not a registered miner at that block has a commitment;
- no miner has two commitments in one round, and each lies in its round's commit phase;
- weights come only from validators authorised at that block, once per round, in the
  round's weights phase, and only as the reveal of that validator's own commitment made in
  the round's evaluate phase;
- checkpoints come only from the owner or an authorised merger, once per round, in the
  round's merge phase (never early, never late: a late one would change a running round's
  base).

The state is read back through the paged views (membersPage, commitmentsPage, weightsPage)
and checkpointOf, as the roles read it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol.chain import ChainError
from protocol.chain.evm import PAGE, WEIGHT_SETS_PAGE, EvmChain, deploy_registry
from protocol.round.schedule import Schedule, phase_bounds, position

# Short phases so a sequence of ~30 calls crosses several rounds and every phase.
LENGTHS = (2, 3, 1, 2, 3, 2)
BOND = 1  # wei: registering with 0 is refused, so InsufficientBond is reachable
ACTORS = 5  # accounts[0] deploys (the owner); all five act at random
SALT = b"\x07" * 32  # every weights commitment's salt: the uids decide whether a reveal matches


# ---------------------------------------------------------------------------- the model


@dataclass
class Member:
    uid: int
    miner: bool = False
    validator: bool = False
    bond: int = 0


@dataclass
class Model:
    """The registry's rules in plain Python, and a log of who held which role when."""

    owner: str
    schedule: Schedule
    block: int  # the latest block; a successful call lands in block + 1
    min_bond: int = BOND
    members: dict[str, Member] = field(default_factory=dict)
    slots: list[str | None] = field(default_factory=list)  # uid -> address (None: free)
    free: list[int] = field(default_factory=list)
    mergers: set[str] = field(default_factory=set)
    commitments: dict[int, list[tuple[str, int, str]]] = field(default_factory=dict)
    weights: dict[int, list[tuple[str, int, list[int]]]] = field(default_factory=dict)
    weight_commitments: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    checkpoints: list[tuple[int, str, int]] = field(default_factory=list)
    roles: list[tuple[int, str, str, bool]] = field(default_factory=list)  # block, addr, role, on

    # -- helpers
    def _allocate(self, addr: str) -> Member:
        if self.free:
            uid = self.free.pop()
            self.slots[uid] = addr
        else:
            uid = len(self.slots)
            self.slots.append(addr)
        self.members[addr] = Member(uid)
        return self.members[addr]

    def _free(self, addr: str) -> None:
        m = self.members.pop(addr)
        self.slots[m.uid] = None
        self.free.append(m.uid)

    def _phase_error(self, rnd: int, phase: str) -> str | None:
        pos = position(self.schedule, self.block + 1)
        if pos is None or pos.round != rnd or pos.phase != phase:
            return "WrongPhase"
        return None

    def _role(self, addr: str, role: str, on: bool) -> None:
        self.roles.append((self.block + 1, addr, role, on))

    def had_role(self, addr: str, role: str, block: int) -> bool:
        """Whether addr held role when a transaction ran in `block` (changes before it)."""
        held = role == "owner" and addr == self.owner
        for b, a, r, on in self.roles:
            if b < block and a == addr and r == role:
                held = on
        return held

    # -- the contract's external functions: None on success, else the error name
    def register(self, sender: str, value: int) -> str | None:
        m = self.members.get(sender)
        if m is not None and m.miner:
            return "AlreadyRegistered"
        if value < self.min_bond:
            return "InsufficientBond"
        m = m or self._allocate(sender)
        m.miner, m.bond = True, value
        self._role(sender, "miner", True)
        return None

    def deregister(self, sender: str) -> str | None:
        m = self.members.get(sender)
        if m is None or not m.miner:
            return "NotRegistered"
        m.miner, m.bond = False, 0
        if not m.validator:
            self._free(sender)
        self._role(sender, "miner", False)
        return None

    def set_validator(self, sender: str, account: str, allowed: bool) -> str | None:
        if sender != self.owner:
            return "NotOwner"
        m = self.members.get(account)
        if allowed:
            m = m or self._allocate(account)
            m.validator = True
        else:
            if m is None or not m.validator:
                return "NotValidator"
            m.validator = False
            if not m.miner:
                self._free(account)
        self._role(account, "validator", allowed)
        return None

    def set_merger(self, sender: str, account: str, allowed: bool) -> str | None:
        if sender != self.owner:
            return "NotOwner"
        (self.mergers.add if allowed else self.mergers.discard)(account)
        self._role(account, "merger", allowed)
        return None

    def commit(self, sender: str, rnd: int, digest: str) -> str | None:
        m = self.members.get(sender)
        if m is None or not m.miner:
            return "NotRegistered"
        if err := self._phase_error(rnd, "commit"):
            return err
        rows = self.commitments.setdefault(rnd, [])
        if any(a == sender for a, _, _ in rows):
            return "AlreadyCommitted"
        rows.append((sender, self.block + 1, digest))
        return None

    def commit_weights(self, sender: str, rnd: int, uids: list[int]) -> str | None:
        m = self.members.get(sender)
        if m is None or not m.validator:
            return "NotValidator"
        if err := self._phase_error(rnd, "evaluate"):
            return err
        if (rnd, sender) in self.weight_commitments:
            return "AlreadyCommittedWeights"
        self.weight_commitments[(rnd, sender)] = list(uids)
        return None

    def set_weights(self, sender: str, rnd: int, uids: list[int]) -> str | None:
        m = self.members.get(sender)
        if m is None or not m.validator:
            return "NotValidator"
        if err := self._phase_error(rnd, "weights"):
            return err
        rows = self.weights.setdefault(rnd, [])
        if any(a == sender for a, _, _ in rows):
            return "AlreadySetWeights"
        if (rnd, sender) not in self.weight_commitments:
            return "NoWeightCommitment"
        if self.weight_commitments[(rnd, sender)] != list(uids):
            return "WeightsMismatch"
        for uid in uids:  # unique by construction; occupied slots only
            if uid >= len(self.slots) or self.slots[uid] is None:
                return "InvalidUid"
        rows.append((sender, self.block + 1, list(uids)))
        return None

    def publish_checkpoint(self, sender: str, rnd: int, digest: str) -> str | None:
        if sender != self.owner and sender not in self.mergers:
            return "NotMerger"
        if err := self._phase_error(rnd, "merge"):
            return err
        if any(r == rnd for r, _, _ in self.checkpoints):
            return "AlreadyPublished"
        self.checkpoints.append((rnd, digest, self.block + 1))
        return None


# ---------------------------------------------------------------------------- the actions

actor = st.integers(0, ACTORS - 1)
owner_mostly = st.sampled_from([0, 0, 0, 1, 2, 3, 4])  # role changes by the owner, mostly
offset = st.sampled_from([-1, 0, 0, 1])  # the round called for, relative to the current one
# Whether a phase-bound call first mines to its phase (unless already in it): random blocks
# alone would rarely put a call in a 3-block window of a 12-block round.
seek = st.booleans()
SEEKS = {"commit": "commit", "wcommit": "evaluate", "weights": "weights", "checkpoint": "merge"}
PHASE_NAMES = ("train", "commit", "reveal", "evaluate", "weights", "merge")
ONE = st.one_of(
    st.tuples(st.just("register"), actor, st.sampled_from([BOND, BOND, 0])),
    st.tuples(st.just("deregister"), actor),
    st.tuples(st.just("commit"), actor, offset, st.integers(0, 3), seek),
    st.tuples(
        st.just("wcommit"),
        actor,
        offset,
        st.lists(st.integers(0, 6), max_size=3, unique=True),
        seek,
    ),
    st.tuples(
        st.just("weights"),
        actor,
        offset,
        st.lists(st.integers(0, 6), max_size=3, unique=True),
        seek,
    ),
    st.tuples(st.just("checkpoint"), actor, st.sampled_from([-1, 0, 1]), st.integers(0, 3), seek),
    st.tuples(st.just("validator"), owner_mostly, actor, st.booleans()),
    st.tuples(st.just("merger"), owner_mostly, actor, st.booleans()),
    st.tuples(st.just("mine"), st.integers(1, 8)),
    st.tuples(st.just("goto"), st.sampled_from(PHASE_NAMES)),
).map(lambda a: [a])
# The same call twice in a row, in its phase: the once-per-round rules need repeats, which
# independent draws seldom produce.
TWICE = st.one_of(
    st.tuples(actor, st.integers(0, 3)).map(
        lambda t: [("commit", t[0], 0, t[1], True), ("commit", t[0], 0, t[1] + 1, True)]
    ),
    st.tuples(actor, st.lists(st.integers(0, 6), max_size=3, unique=True)).map(
        lambda t: [("wcommit", t[0], 0, t[1], True)] * 2 + [("weights", t[0], 0, t[1], True)] * 2
    ),
    st.tuples(actor, st.integers(0, 3)).map(
        lambda t: [("checkpoint", t[0], 0, t[1], True), ("checkpoint", 0, 0, t[1], True)]
    ),
)
ACTIONS = st.lists(ONE | TWICE, min_size=8, max_size=30).map(lambda xs: [a for x in xs for a in x])
# A random starting cast (one validator at least), so sequences spend their calls past the
# membership checks.
PRELUDE = st.tuples(
    st.lists(st.tuples(st.just("register"), actor, st.just(BOND)), max_size=4),
    st.lists(
        st.tuples(st.just("validator"), st.just(0), actor, st.just(True)), min_size=1, max_size=2
    ),
    st.lists(st.tuples(st.just("merger"), st.just(0), actor, st.just(True)), max_size=1),
).map(lambda parts: [a for part in parts for a in part])


def digest(seed: int, what: str) -> str:
    return hashlib.sha256(f"{what}-{seed}".encode()).hexdigest()


def blocks_to(model: Model, phase: str) -> int:
    """Empty blocks to mine so the next transaction lands where `phase` next begins."""
    nxt = model.block + 1
    pos = position(model.schedule, nxt)
    rnd = pos.round if pos is not None else 0
    first = phase_bounds(model.schedule, rnd, phase)[0]
    if first < nxt:
        first = phase_bounds(model.schedule, rnd + 1, phase)[0]
    return first - nxt


def run(node, model: Model, chains: list[EvmChain], action: tuple) -> str:
    """Apply one action to the chain and to the model; their outcomes must agree. Returns
    "ok" or the error name."""
    kind, *args = action
    if kind in ("mine", "goto"):
        blocks = args[0] if kind == "mine" else blocks_to(model, args[0])
        node.mine(blocks)
        model.block += blocks
        return "ok"
    sender = args[0]
    chain, addr = chains[sender], chains[sender].address
    pos = position(model.schedule, model.block + 1)
    if kind in SEEKS and args[-1] and (pos is None or pos.phase != SEEKS[kind]):
        blocks = blocks_to(model, SEEKS[kind])
        node.mine(blocks)
        model.block += blocks
        pos = position(model.schedule, model.block + 1)
    current = pos.round if pos is not None else 0
    if kind == "register":
        call, want = (lambda: chain.register(args[1])), model.register(addr, args[1])
    elif kind == "deregister":
        call, want = chain.deregister, model.deregister(addr)
    elif kind == "commit":
        rnd, d = max(0, current + args[1]), digest(args[2], f"{addr}-commit")
        call, want = (lambda: chain.commit(rnd, d)), model.commit(addr, rnd, d)
    elif kind == "wcommit":
        rnd, uids = max(0, current + args[1]), args[2]
        call = lambda: chain.commit_weights(rnd, uids, [1.0] * len(uids), SALT)  # noqa: E731
        want = model.commit_weights(addr, rnd, uids)
    elif kind == "weights":
        rnd, uids = max(0, current + args[1]), args[2]
        call = lambda: chain.set_weights(rnd, uids, [1.0] * len(uids), SALT)  # noqa: E731
        want = model.set_weights(addr, rnd, uids)
    elif kind == "checkpoint":
        rnd, d = max(0, current + args[1]), digest(args[2], "ckpt")
        call = lambda: chain.publish_checkpoint(rnd, d, "file:///ckpt", d)  # noqa: E731
        want = model.publish_checkpoint(addr, rnd, d)
    else:  # validator / merger: set by `sender` for `target`
        target = chains[args[1]].address
        fn = chain.authorise_validator if kind == "validator" else chain.set_merger
        call = lambda: fn(target, args[2])  # noqa: E731
        method = model.set_validator if kind == "validator" else model.set_merger
        want = method(addr, target, args[2])
    try:
        call()
        got = None
    except ChainError as e:
        got = e.code
    assert got == want, f"{action}: chain says {got}, the model {want}"
    if want is None:
        model.block += 1
    assert node.w3.eth.block_number == model.block, f"{action}: a revert must not mine"
    return got or "ok"


# ---------------------------------------------------------------------------- the checks


def check_state(model: Model, owner: EvmChain) -> None:
    """The chain's full state equals the model's, and the invariants hold on the history."""
    fns = owner.contract.functions
    last = position(model.schedule, model.block + 1)
    rounds = range((last.round if last else 0) + 2)

    def paged(count: int, page, size: int) -> list:
        return [row for start in range(0, count, size) for row in page(start, size).call()]

    for rnd in rounds:
        rows = paged(fns.commitmentCount(rnd).call(), partial(fns.commitmentsPage, rnd), PAGE)
        assert [(a, b, d.hex()) for a, _, b, d in rows] == model.commitments.get(rnd, [])
        assert len({a for a, *_ in rows}) == len(rows), "a miner committed twice in a round"
        for addr, _uid, blk, _d in rows:
            assert model.had_role(addr, "miner", blk), f"{addr} committed unregistered"
            pos = position(model.schedule, blk)
            assert (pos.round, pos.phase) == (rnd, "commit")
        sets = paged(
            fns.weightSetCount(rnd).call(), partial(fns.weightsPage, rnd), WEIGHT_SETS_PAGE
        )
        assert [(v, b, list(us)) for _, v, b, us, _ in sets] == model.weights.get(rnd, [])
        assert len({v for _, v, *_ in sets}) == len(sets), "a validator voted twice in a round"
        for _vuid, addr, blk, _us, _ws in sets:
            assert model.had_role(addr, "validator", blk), f"{addr} set weights unauthorised"
            pos = position(model.schedule, blk)
            assert (pos.round, pos.phase) == (rnd, "weights")
    published = [c for r in rounds for found, c in [fns.checkpointOf(r).call()] if found]
    assert [(r, d.hex(), b) for r, d, _, _, b, _ in published] == model.checkpoints
    assert fns.checkpointCount().call() == len(model.checkpoints)
    assert len({r for r, *_ in published}) == len(published), "a round published twice"
    for rnd, _d, _uri, _dd, blk, publisher in published:
        assert model.had_role(publisher, "owner", blk) or model.had_role(
            publisher, "merger", blk
        ), f"{publisher} published without the merger role"
        pos = position(model.schedule, blk)
        assert (pos.round, pos.phase) == (rnd, "merge")
    rows = paged(fns.memberCount().call(), fns.membersPage, PAGE)
    members = [(uid, a, bond, miner, val) for uid, a, bond, miner, val in rows]
    want = sorted((m.uid, a, m.bond, m.miner, m.validator) for a, m in model.members.items())
    assert members == want


@pytest.fixture(scope="module")
def clients(pyevm_node):
    """Deploys a registry per sequence: returns a function giving (model, chains)."""
    node = pyevm_node

    def fresh(start_in: int = 3) -> tuple[Model, list[EvmChain]]:
        keys = node.accounts[:ACTORS]
        schedule = Schedule(node.w3.eth.block_number + start_in, *LENGTHS)
        address = deploy_registry(node.w3, keys[0], schedule, BOND)
        chains = [EvmChain(node.w3, address, k, timeout=30) for k in keys]
        model = Model(owner=keys[0].address, schedule=schedule, block=node.w3.eth.block_number)
        return model, chains

    return node, fresh


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(PRELUDE, ACTIONS)
def test_random_call_sequences_follow_the_rules(clients, prelude, actions):
    node, fresh = clients
    model, chains = fresh()
    for action in prelude + actions:
        # Outcome statistics: pytest --hypothesis-show-statistics shows which paths ran.
        event(f"{action[0]}: {run(node, model, chains, action)}")
    check_state(model, chains[0])


def test_a_scripted_sequence_exercises_every_success_path(clients):
    """Every success and revert path once, with the outcomes written out by hand: the model
    is checked against the contract's documented rules, not only against the chain."""
    node, fresh = clients
    model, chains = fresh(start_in=12)

    def goto(phase: str) -> None:
        """Mine so the next transaction lands in the first block of `phase` of round 0."""
        first = phase_bounds(model.schedule, 0, phase)[0]
        assert model.block < first, "the scripted calls ran past the phase"
        node.mine(first - 1 - model.block)
        model.block = first - 1

    def play(*actions) -> list[str]:
        return [run(node, model, chains, a) for a in actions]

    assert play(
        ("register", 1, BOND),
        ("register", 2, BOND),
        ("register", 3, 0),
        ("validator", 0, 4, True),
        ("merger", 0, 3, True),
        ("commit", 1, 0, 0, False),
        ("weights", 4, 0, [0], False),
        ("wcommit", 4, 0, [0, 1], False),
    ) == ["ok", "ok", "InsufficientBond", "ok", "ok", "WrongPhase", "WrongPhase", "WrongPhase"]
    goto("commit")
    assert play(
        ("commit", 1, 0, 0, False),
        ("commit", 1, 0, 1, False),
        ("commit", 2, 0, 2, False),
        ("commit", 3, 0, 0, False),
        ("commit", 4, 0, 0, False),
    ) == ["ok", "AlreadyCommitted", "ok", "NotRegistered", "NotRegistered"]
    goto("evaluate")
    assert play(
        ("wcommit", 4, 0, [0, 1], False),
        ("wcommit", 4, 0, [1], False),
        ("wcommit", 1, 0, [0], False),
    ) == ["ok", "AlreadyCommittedWeights", "NotValidator"]
    goto("weights")
    assert play(
        ("weights", 4, 0, [1, 0], False),
        ("weights", 4, 0, [0, 1], False),
        ("weights", 4, 0, [1], False),
        ("weights", 1, 0, [0], False),
        ("validator", 0, 3, True),
        ("weights", 3, 0, [0], False),
        ("checkpoint", 3, 0, 0, False),
    ) == [
        "WeightsMismatch",
        "ok",
        "AlreadySetWeights",
        "NotValidator",
        "ok",
        "NoWeightCommitment",
        "WrongPhase",
    ]
    goto("merge")
    assert play(
        ("checkpoint", 1, 0, 0, False),
        ("checkpoint", 3, 0, 0, False),
        ("checkpoint", 0, 0, 1, False),
        ("deregister", 1),
        ("deregister", 1),
        ("register", 1, BOND),
        ("validator", 0, 4, False),
        ("validator", 0, 4, False),
        ("merger", 2, 2, True),
        ("validator", 0, 3, False),
    ) == [
        "NotMerger",
        "ok",
        "AlreadyPublished",
        "ok",
        "NotRegistered",
        "ok",
        "ok",
        "NotValidator",
        "NotOwner",
        "ok",
    ]
    goto_next = blocks_to(model, "train")  # round 1 has started: round 0's checkpoint is late
    node.mine(goto_next)
    model.block += goto_next
    assert play(("checkpoint", 0, -1, 2, False)) == ["WrongPhase"]
    check_state(model, chains[0])
    assert [a for a, _, _ in model.commitments[0]] == [chains[1].address, chains[2].address]
    assert [a for a, _, _ in model.weights[0]] == [chains[4].address]
    assert [r for r, _, _ in model.checkpoints] == [0]
