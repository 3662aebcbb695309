"""`moesaic {miner,validator,merger} run --config FILE [--set k=v ...] [--dry-run]`: a role as a
long-running process, round after round.

    moesaic miner run --config configs/devnet.toml --set chain.registry=0x... --set run.rounds=1

The loop reads like the protocol: connect to the chain and the store, build the role from the
config, then `role.run_round(r, wait)` for each round from the current one on. Roles keep their
own per-round state, so a process stopped anywhere (Ctrl-C, a crash) and started again resumes.
Torch and web3 are imported only after the arguments parsed (fast `--help`, `--dry-run`).
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING

from protocol.schedule import PHASES, Schedule, position

if TYPE_CHECKING:
    from protocol.config import Config

log = logging.getLogger("moesaic.run")

# The last phase in which a role starting up still joins the round in progress; later it waits
# for the next round. A miner can still commit a delta it already trained (a restart), a
# validator still sets weights, a merger still merges.
JOIN_BY = {"miner": "commit", "validator": "weights", "merger": "merge"}


def first_round(schedule: Schedule, block: int, join_by: str) -> int:
    """The round a role started at `block` works on first: the current one while it is no later
    than phase `join_by`, else the next; round 0 before the schedule starts."""
    pos = position(schedule, block)
    if pos is None:
        return 0
    late = PHASES.index(pos.phase) > PHASES.index(join_by)
    return pos.round + 1 if late else pos.round


def add_run(sub, role: str) -> None:
    """Add `run` to a role's command group (`sub` is the group's subparsers)."""
    p = sub.add_parser("run", help=f"run the {role} round after round from a TOML config")
    p.add_argument("--config", required=True, help="TOML file, e.g. configs/devnet.toml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. miner.train.lr=3e-3 (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(handler=functools.partial(_run, role=role))


def _run(args, role: str) -> int:
    from protocol.config import check_runnable, describe, load_config

    config = load_config(args.config, args.overrides)
    config.role(role)  # a file without the role's section fails here, dry run or not
    if args.dry_run:
        print(describe(config, role), end="")
        return 0
    check_runnable(config, role)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per store request
    chain, store, signer = connect(config)
    node = build_role(role, config, chain, store, signer)
    try:
        run_rounds(role, node, chain, config)
    except KeyboardInterrupt:
        log.info("%s: interrupted; state is kept, run again to resume", role)
    return 0


def connect(config: Config):
    """The chain client (sending with [chain] key_file), the store and the manifest signer."""
    from protocol.chain.evm import EvmChain, load_account
    from protocol.config import read_key
    from protocol.keys import load_signer
    from protocol.storage import open_store

    chain_key = read_key(config.chain.key_file)
    try:
        account = load_account(key=chain_key)
        signer = load_signer(chain_key)
    except ValueError:
        # Never echo the parse error: it may quote the key.
        raise ValueError(f"{config.chain.key_file}: not a 0x + 64 hex private key") from None
    chain = EvmChain(config.chain.rpc, config.chain.registry, account)
    store_signer = signer
    if config.store.key_file:
        try:
            store_signer = load_signer(read_key(config.store.key_file))
        except ValueError:
            raise ValueError(f"{config.store.key_file}: not a recognised key") from None
    store = open_store(config.store.uri, **_store_options(config.store.uri, store_signer))
    log.info("chain %s registry %s as %s; store %s", config.chain.rpc, chain.registry,
             chain.address, config.store.uri)  # fmt: skip
    return chain, store, signer


def _store_options(uri: str, signer) -> dict:
    # Only the blob server authenticates uploads with our keys; file and s3 take no signer.
    return {"signer": signer} if uri.startswith(("http://", "https://")) else {}


def build_role(role: str, config: Config, chain, store, signer):
    """The role object, composed from the chain client, store and config sections."""
    from protocol.config import chain_label

    schedule = chain.schedule()
    common = dict(
        schedule=schedule,
        chain_label=chain_label(config, chain.w3.eth.chain_id),
        task_id=config.task.task_id,
        base_dir=config.task.base_dir,
        assignment_path=config.task.assignment,
    )
    if role == "miner":
        from miner.node import Miner

        m = config.role("miner")
        return Miner(
            chain, store, signer, data_spec=config.data, work_dir=m.work_dir, train=m.train,
            quiet=True, **common,
        )  # fmt: skip
    section = config.role(role)
    evaluation = dict(
        domain_spec=config.task.domain,
        general_specs=config.task.general,
        state_dir=section.state_dir,
        settings=section.settings,
    )
    if role == "validator":
        from validator.node import Validator

        return Validator(chain, store, **common, **evaluation)
    from merger.node import Merger

    return Merger(chain, store, **common, **evaluation)


def run_rounds(role: str, node, chain, config: Config) -> None:
    """`node.run_round(r, wait)` for [run] rounds rounds (None: forever) from the current one."""
    from validator.node import block_waiter

    wait = block_waiter(chain, config.run.poll_s)
    block = chain.block()
    r = first_round(node.schedule, block, JOIN_BY[role])
    log.info("%s: at block %d, starting with round %d", role, block, r)
    done = 0
    while config.run.rounds is None or done < config.run.rounds:
        log.info("%s: round %d: start", role, r)
        record = node.run_round(r, wait=wait)
        log.info("%s: round %d: done %s", role, r, _brief(record))
        r, done = r + 1, done + 1


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
