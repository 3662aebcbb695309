"""Argument parsing and dispatch for `moesaic`. Each command group registers itself here."""

from __future__ import annotations

import argparse
import sys

from moesaic import __version__
from moesaic.commands import (
    artifact,
    base,
    chain,
    checkpoint,
    dashboard,
    data,
    devnet,
    experts,
    merge,
    merger,
    miner,
    report,
    store,
    validator,
)
from protocol.ops.logs import quiet_third_party, redact_text

GROUPS = (
    data,
    base,
    experts,
    miner,
    artifact,
    merge,
    chain,
    store,
    checkpoint,
    validator,
    merger,
    devnet,
    dashboard,
    report,
)


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesaic",
        description="Decentralized expert-sparse fine-tuning of Mixture-of-Experts models.",
    )
    parser.add_argument("--version", action="version", version=f"moesaic {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, CliError) as e:
        # Bad input or config: one actionable line, no traceback, no URL's credentials.
        print(f"moesaic {args.command}: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
