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
import json
import logging
import sys
import time
from typing import TYPE_CHECKING

from protocol.round.schedule import PHASES, Schedule, position

if TYPE_CHECKING:
    from moesaic.config import Config

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
    # btcli's spelling, so Bittensor operators can reuse their habits; each maps to a [chain] key.
    for flag, key in WALLET_FLAGS.items():
        p.add_argument(flag, dest=key, default=None, help=f"sets chain.{key}")
    p.set_defaults(handler=functools.partial(_run, role=role))


WALLET_FLAGS = {
    "--wallet.name": "wallet_name",
    "--wallet.hotkey": "wallet_hotkey",
    "--wallet.path": "wallet_path",
}


def _wallet_overrides(args) -> list[str]:
    """--wallet.* flags as [chain] overrides; a wallet on the command line replaces the file's
    key_file or keystore (a config holds exactly one key source)."""
    given = {key: getattr(args, key, None) for key in WALLET_FLAGS.values()}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return []
    out = [] if "wallet_name" not in given else ["chain.key_file=null", "chain.keystore=null"]
    # Quoted TOML strings: a name like "1e3" or "true" must stay a string.
    return out + [f"chain.{k}={json.dumps(v)}" for k, v in given.items()]


def _run(args, role: str) -> int:
    from moesaic.config import check_runnable, describe, load_config

    config = load_config(args.config, [*args.overrides, *_wallet_overrides(args)])
    config.role(role)  # a file without the role's section fails here, dry run or not
    if args.dry_run:
        print(describe(config, role), end="")
        print(f"# sends as: {_key_identity(config)}")
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
    """The chain client (sending with [chain] key_file or keystore), the store and the manifest
    signer."""
    from protocol.chain.evm import EvmChain, load_account
    from protocol.config import read_key
    from protocol.identity.keys import EthSigner, load_signer
    from protocol.storage import open_store

    if config.chain.keystore:
        from protocol.identity.wallet import load_keystore

        account = load_keystore(
            config.chain.keystore,
            password_env=config.chain.keystore_password_env,
            password_file=config.chain.keystore_password_file,
        )
        signer = EthSigner(account.key)
    else:
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


def _key_identity(config: Config) -> str:
    """The public identity the config's key source sends as, for --dry-run; never a secret.
    A key that cannot be read on this machine is reported, not fatal (configs are checked
    before keys are installed)."""
    from protocol.identity.wallet import KeyFileError, Wallet, inspect_wallet, keystore_address

    c = config.chain
    try:
        if c.wallet_name:
            info = inspect_wallet(Wallet(c.wallet_name, c.wallet_hotkey, c.wallet_path))
            cold = info.coldkey_ss58 or "no coldkeypub.txt"
            return f"hotkey {info.hotkey_ss58} (coldkey {cold}, {info.coldkey})"
        if c.keystore:
            address = keystore_address(c.keystore)
            return f"keystore address {address or '(not declared in the file)'}"
        if c.key_file:
            return f"key file {c.key_file} (address shown when the role starts)"
    except (KeyFileError, OSError) as e:
        return f"key not readable here: {e}"
    return "no key configured"


def _store_options(uri: str, signer) -> dict:
    # Only the blob server authenticates uploads with our keys; file and s3 take no signer.
    return {"signer": signer} if uri.startswith(("http://", "https://")) else {}


def build_role(role: str, config: Config, chain, store, signer):
    """The role object, composed from the chain client, store and config sections."""
    from moesaic.config import chain_label

    schedule = chain.schedule()
    common = dict(
        schedule=schedule,
        chain_label=chain_label(config, chain.w3.eth.chain_id),
        task_id=config.task.task_id,
        base_dir=config.task.base_dir,
        assignment_path=config.task.assignment,
    )
    section = config.role(role)
    common["lineage"] = _lineage(config, chain, section)
    if role == "miner":
        from miner.node import Miner

        return Miner(
            chain, store, signer, data_spec=config.data, work_dir=section.work_dir,
            train=section.train, quiet=True, strategy=section.strategy, **common,
        )  # fmt: skip
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

    compose = [(t.task_id, t.assignment, t.domain) for t in section.compose]
    return Merger(chain, store, **common, **evaluation, compose=compose)


def _lineage(config: Config, chain, section):
    """The role's view of the checkpoint lineage ([task] follow_checkpoints), or None."""
    if not config.task.follow_checkpoints:
        return None
    from pathlib import Path

    from protocol.round.lineage import Lineage

    own_dir = Path(getattr(section, "work_dir", None) or section.state_dir)
    return Lineage(chain, task_base=config.task.base_dir, cache_dir=own_dir / "bases")


def run_rounds(role: str, node, chain, config: Config) -> None:
    """`node.run_round(r, wait)` for [run] rounds rounds (None: forever) from the current one."""
    from protocol.ops.metrics import RoleMetrics
    from validator.node import block_waiter

    metrics = RoleMetrics(role)
    if metrics.serve(config.metrics.port):
        log.info("%s: metrics on http://127.0.0.1:%d/metrics", role, metrics.port)
    poll = block_waiter(chain, config.run.poll_s)

    def wait(target: int) -> None:
        # Every wait ends at a phase boundary the role cares about: report where it now is.
        poll(target)
        pos = position(node.schedule, chain.block())
        metrics.phase(pos.phase if pos else "idle")

    block = chain.block()
    r = first_round(node.schedule, block, JOIN_BY[role])
    log.info("%s: at block %d, starting with round %d", role, block, r)
    done = 0
    try:
        while config.run.rounds is None or done < config.run.rounds:
            log.info("%s: round %d: start", role, r)
            metrics.round_started(r)
            pos = position(node.schedule, chain.block())
            metrics.phase(pos.phase if pos else "idle")
            try:
                record = node.run_round(r, wait=wait)
            except Exception as e:
                metrics.error("round_failed")
                verdict = after_failure(e)
                if verdict == "raise":
                    raise
                if verdict == "retry":
                    log.warning("%s: round %d: chain unavailable (%s); retrying", role, r, e)
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
TRANSIENT = {"Unreachable", "Unconfirmed"}
TOO_LATE = {"WrongPhase", "AlreadyCommitted", "AlreadySetWeights", "AlreadyPublished"}


def after_failure(error: Exception) -> str:
    """What the run loop does after run_round raised: "retry" the round, "skip" to the next,
    or "raise" (a bug, bad config or conflicting state a human must look at)."""
    from miner.node import WrongPhase
    from protocol.chain import ChainError

    if isinstance(error, WrongPhase):
        return "skip"
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
