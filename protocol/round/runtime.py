"""The role runtime: connect to the chain and the store, build a role, run it round after round.

    from miner.node import build
    run_role("miner", build, config, config.miner)     # what `moesaic miner run` does

The loop reads like the protocol: open the chain and the store, build the role from the shared
RoleContext and its own config section, then `role.run_round(r, wait)` for each round from the
current one on. Roles keep their own per-round state (protocol.round.state), so a process
stopped anywhere (Ctrl-C, a crash) and started again resumes. A failed round is retried, skipped
or raised by `after_failure`.

The runtime sits in protocol so that the three roles share it without importing each other; it
is written against the shared config sections (`SharedConfig`) and takes each role's `build`
function from the caller. Torch-free; web3 is imported when the chain is opened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from protocol.chain import ChainError, DispatchError, chain_signer, open_chain
from protocol.config import read_key
from protocol.identity.keys import load_signer
from protocol.ops.logs import redact_url
from protocol.ops.metrics import RoleMetrics
from protocol.round.context import RoleContext
from protocol.round.lineage import Lineage
from protocol.round.schedule import PHASES, Schedule, WrongPhase, position
from protocol.storage import open_store

if TYPE_CHECKING:
    from protocol.chain import Chain
    from protocol.config import ChainConfig, MetricsConfig, RunConfig, StoreConfig, TaskConfig
    from protocol.identity.keys import Signer
    from protocol.storage import Store

log = logging.getLogger("moesaic.run")

Wait = Callable[[int], None]  # returns once chain.block() >= the block given

# The last phase in which a role starting up still joins the round in progress; later it waits
# for the next round. A miner can still commit a delta it already trained (a restart), a
# validator still sets weights, a merger still merges.
JOIN_BY = {"miner": "commit", "validator": "weights", "merger": "merge"}


class SharedConfig(Protocol):
    """The config sections every role reads (the composed config of a process has them)."""

    chain: ChainConfig
    store: StoreConfig
    task: TaskConfig
    run: RunConfig
    metrics: MetricsConfig


class Role(Protocol):
    """What the runtime drives: one round at a time, resumable."""

    schedule: Schedule

    def run_round(self, r: int, wait: Wait) -> dict: ...


# A role module's `build(ctx, section, task)`: the role from the shared context, its own config
# section and the task (miner/node.py, validator/node.py, merger/node.py).
Build = Callable[[RoleContext, Any, "TaskConfig"], Role]


def run_role(role: str, build: Build, config: SharedConfig, section: Any) -> None:
    """Connect, build `role` with `build` from the context and `section`, run its rounds.
    Ctrl-C ends the loop; the state is kept for the next start."""
    chain, store, signer = connect(config)
    ctx = role_context(config, chain, store, signer, own_dir(section))
    node = build(ctx, section, config.task)
    try:
        run_rounds(role, node, chain, config)
    except KeyboardInterrupt:
        log.info("%s: interrupted; state is kept, run again to resume", role)


def connect(config: SharedConfig) -> tuple[Chain, Store, Signer | None]:
    """The chain client (sending with [chain]'s key), the store and the manifest signer."""
    signer = chain_signer(config.chain)
    chain = open_chain(config.chain, signer)
    store_signer = signer
    if config.store.key_file:
        try:
            store_signer = load_signer(read_key(config.store.key_file))
        except ValueError:
            raise ValueError(f"{config.store.key_file}: not a recognised key") from None
    store = open_store(config.store.uri, **_store_options(config.store.uri, store_signer))
    log.info("chain %s %s at %s as %s; store %s", config.chain.kind, chain.label(),
             redact_url(config.chain.rpc), chain.identity(), redact_url(config.store.uri))  # fmt: skip
    return chain, store, signer


def _store_options(uri: str, signer) -> dict:
    # Only the blob server authenticates uploads with our keys; file and s3 take no signer.
    return {"signer": signer} if uri.startswith(("http://", "https://")) else {}


def own_dir(section: Any) -> Path:
    """The directory a role keeps its rounds in: [miner] work_dir, else the section's state_dir."""
    return Path(getattr(section, "work_dir", None) or section.state_dir)


def role_context(
    config: SharedConfig, chain: Chain, store: Store, signer: Signer | None, home: Path
) -> RoleContext:
    """The RoleContext of a role whose own files live in `home` (its lineage cache is there)."""
    lineage = None
    if config.task.follow_checkpoints:
        lineage = Lineage(chain, task_base=config.task.base_dir, cache_dir=Path(home) / "bases")
    return RoleContext(
        chain,
        store,
        schedule=chain.schedule(),
        chain_label=chain.label(),
        task_id=config.task.task_id,
        base_dir=config.task.base_dir,
        assignment_path=config.task.assignment,
        lineage=lineage,
        signer=signer,
    )


def first_round(schedule: Schedule, block: int, join_by: str) -> int:
    """The round a role started at `block` works on first: the current one while it is no later
    than phase `join_by`, else the next; round 0 before the schedule starts."""
    pos = position(schedule, block)
    if pos is None:
        return 0
    late = PHASES.index(pos.phase) > PHASES.index(join_by)
    return pos.round + 1 if late else pos.round


def block_waiter(chain: Chain, poll_s: float = 2.0, sleep=time.sleep) -> Wait:
    """A `wait` for a daemon: poll the chain every poll_s seconds until it reaches the block."""

    def wait(block: int) -> None:
        while chain.block() < block:
            sleep(poll_s)

    return wait


def run_rounds(role: str, node: Role, chain: Chain, config: SharedConfig) -> None:
    """`node.run_round(r, wait)` for [run] rounds rounds (None: forever) from the current one."""
    metrics = RoleMetrics(role)
    if metrics.serve(config.metrics.port):
        log.info("%s: metrics on http://127.0.0.1:%d/metrics", role, metrics.port)
    poll = block_waiter(chain, config.run.poll_s)

    def report_phase() -> None:
        pos = position(node.schedule, chain.block())
        metrics.phase(pos.phase if pos else "idle")

    def wait(target: int) -> None:
        # Every wait ends at a phase boundary the role cares about: report where it now is.
        poll(target)
        report_phase()

    block = chain.block()
    r = first_round(node.schedule, block, JOIN_BY[role])
    log.info("%s: at block %d, starting with round %d", role, block, r)
    done = 0
    try:
        while config.run.rounds is None or done < config.run.rounds:
            log.info("%s: round %d: start", role, r)
            metrics.round_started(r)
            report_phase()
            try:
                record = node.run_round(r, wait=wait)
            except Exception as e:
                metrics.error("round_failed")
                verdict = after_failure(e)
                if verdict == "raise":
                    raise
                if verdict == "retry":
                    log.warning("%s: round %d: not now (%s); retrying", role, r, e)
                    time.sleep(min(60.0, config.run.poll_s * 10))
                    continue  # the round's finished steps are recorded; it resumes
                log.error("%s: round %d: missed (%s); going on with round %d", role, r, e, r + 1)
                r, done = r + 1, done + 1
                continue
            metrics.observe_record(record)
            metrics.phase("idle")
            log.info("%s: round %d: done %s", role, r, _brief(record))
            r, done = r + 1, done + 1
    finally:
        metrics.close()


# Chain errors a later attempt can get past (EvmChain gave up its own retries), and the ones
# that mean the round's window has closed for this role: a daemon goes on with the next round.
# An endpoint answering garbage or an error object (RpcError, BadResponse) may heal; a read
# past the gas cap (OutOfGas) or a transaction the node refuses (Rejected: funds, fees) will
# not within the round, so the daemon logs it and goes on with the next.
# The subtensor backend's own transaction pool verdicts: another transaction of ours holds
# the nonce or was preferred (PriorityTooLow, NonceUsed) or the pool dropped it (Dropped) may
# pass on a later try; one the pool calls invalid (InvalidTransaction, UnknownTransaction: fees,
# a stale era) will not within the round.
TRANSIENT = {
    "Unreachable",
    "Unconfirmed",
    "RpcError",
    "BadResponse",
    "PriorityTooLow",
    "NonceUsed",
    "Dropped",
}
TOO_LATE = {
    "InvalidTransaction",
    "UnknownTransaction",
    "WrongPhase",
    "AlreadyCommitted",
    "AlreadySetWeights",
    "AlreadyCommittedWeights",
    "AlreadyPublished",
    "OutOfGas",
    "Rejected",
}


# Subtensor dispatch errors (DispatchError, named after the runtime's module error) that a
# later attempt within the round can get past: rate limits run out, a reveal window opens. The
# step is retried until it lands or its phase is over (then PhaseMissed skips the round). Every
# other dispatch error gives the round up, logged: no validator permit yet (it comes with an
# epoch once staked), a commitment expired or not found, weights the subnet's hyperparameters
# refuse (too few uids, a changed version key), ...
RETRY_DISPATCH = {
    "SettingWeightsTooFast",
    "CommittingWeightsTooFast",
    "RevealTooEarly",
    "TxRateLimitExceeded",
}


def after_failure(error: Exception) -> str:
    """What the run loop does after run_round raised: "retry" the round, "skip" to the next,
    or "raise" (a bug, bad config or conflicting state a human must look at)."""
    if isinstance(error, WrongPhase):
        return "skip"
    if isinstance(error, DispatchError):
        return "retry" if error.code in RETRY_DISPATCH else "skip"
    if isinstance(error, ChainError):
        if error.code in TRANSIENT:
            return "retry"
        if error.code in TOO_LATE:
            return "skip"
    return "raise"


def _brief(record) -> str:
    """One log line's worth of a round record: step statuses and short scalar results."""
    if not isinstance(record, dict):
        return ""
    parts = []
    for key, value in record.items():
        if isinstance(value, dict) and value.get("status"):
            parts.append(f"{key}={value['status']}")
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            parts.append(f"{key}={str(value)[:16]}")
    return "(" + ", ".join(parts) + ")"
