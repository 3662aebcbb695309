"""`moesaic {miner,validator,merger} run --config FILE [--set k=v ...] [--dry-run]`: a role as a
long-running process, round after round.

    moesaic miner run --config configs/devnet.toml --set chain.registry=0x... --set run.rounds=1

This module parses the arguments, loads the config and hands the role to the runtime
(protocol.round.runtime: connect, build, the round loop and failure handling), with the role's
own `build` (miner/node.py, validator/node.py, merger/node.py). The runtime, torch and web3 are
imported only after the arguments parsed (fast `--help`, `--dry-run`).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from typing import TYPE_CHECKING

from protocol.ops.logs import setup_logging

if TYPE_CHECKING:
    from moesaic.config import Config

# Where each role's `build(ctx, section, task)` lives.
BUILDERS = {"miner": "miner.node", "validator": "validator.node", "merger": "merger.node"}


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
    section = config.role(role)  # a file without the role's section fails here, dry run or not
    if args.dry_run:
        print(describe(config, role), end="")
        print(f"# sends as: {_key_identity(config)}")
        return 0
    check_runnable(config, role)
    setup_logging(logging.INFO)  # every line redacted: an RPC URL's key never reaches the log
    from protocol.round.runtime import run_role

    build = importlib.import_module(BUILDERS[role]).build
    run_role(role, build, config, section)
    return 0


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
