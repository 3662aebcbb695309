"""`moesaic checkpoint`: list the checkpoints a registry records, pull one verified, publish one.

    moesaic checkpoint list --rpc http://127.0.0.1:8545 --registry 0x... [--last 20]
    moesaic checkpoint pull --rpc http://127.0.0.1:8545 --registry 0x... --latest --out in/ckpt
    moesaic checkpoint pull --rpc URL --registry 0x... --round 3 --out in/ckpt --max-bytes 80G
    moesaic checkpoint publish runs/merged --store http://127.0.0.1:8765 --key key.txt

`pull` trusts only the chain: the record's digest is checked against the manifest, the files it
lists and the directory that arrives (protocol/artifact/checkpoint.py). `publish` uploads a directory
and prints the digest and manifest uri an operator (or the merger role) puts on chain; it does
not write to the chain itself. Key files as for `moesaic store` (MOESAIC_STORE_KEY otherwise).

Torch- and web3-free at import, so `moesaic --help` stays fast.
"""

from __future__ import annotations

import functools
import sys

from moesaic.commands.chain import connect_rpc
from moesaic.commands.store import parse_size, signer_from_args, store_from_args

COLUMNS = ("round", "digest", "uri", "deltas digest", "block", "publisher")


def _errors(handler):
    """StorageError and ChainError -> one line and exit 2 through cli.main."""

    @functools.wraps(handler)
    def wrapped(args):
        from moesaic.cli import CliError
        from protocol.chain import ChainError
        from protocol.storage import StorageError

        try:
            return handler(args)
        except (StorageError, ChainError) as e:
            raise CliError(str(e)) from e

    return wrapped


def _chain(args):
    from protocol.chain.evm import EvmChain

    return EvmChain(connect_rpc(args.rpc), args.registry)  # read-only: no key needed


def _table(rows: list[tuple]) -> str:
    """Left-aligned columns two spaces apart, header first; the last column is not padded."""
    cells = [COLUMNS, *[tuple(str(c) for c in r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


@_errors
def _list(args) -> int:
    if args.last < 1:
        raise ValueError("--last must be >= 1")
    from protocol.chain import recent_checkpoints

    cps = recent_checkpoints(_chain(args), args.last)
    if not cps:
        print(f"no checkpoints published on registry {args.registry}")
        return 0
    print(_table([(c.round, c.digest, c.uri, c.deltas_digest, c.block, c.publisher) for c in cps]))
    return 0


def choose(chain, round: int | None):
    """The record for `round`, or the latest one when None."""
    from moesaic.cli import CliError

    if round is None:
        found = chain.latest_checkpoint()
        if found is None:
            raise CliError("no checkpoints published on this registry")
        return found
    found = chain.checkpoint(round)
    if found is None:
        newest = chain.latest_checkpoint()
        newest = f"the latest is round {newest.round}" if newest else "none is published"
        raise CliError(f"no checkpoint for round {round} ({newest})")
    return found


@_errors
def _pull(args) -> int:
    from protocol.artifact.checkpoint import pull

    if args.max_bytes < 0:
        raise ValueError("--max-bytes must be >= 0")
    cp = choose(_chain(args), args.round)
    path = pull(
        cp, args.out, max_bytes=args.max_bytes, progress=not args.quiet, overwrite=args.overwrite
    )
    print(f"round   {cp.round}")
    print(f"digest  {cp.digest}")
    print(f"path    {path.resolve()}")
    return 0


@_errors
def _publish(args) -> int:
    from protocol.artifact.checkpoint import publish_dir

    digest, uri, total = publish_dir(
        store_from_args(args, signer_from_args(args)), args.dir, progress=not args.quiet
    )
    print(f"digest  {digest}")
    print(f"uri     {uri}")
    print(f"bytes   {total}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="merged checkpoints: list, pull verified, publish")
    g = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)

    ls = g.add_parser("list", help="the latest checkpoints the registry records, oldest first")
    _chain_args(ls)
    ls.add_argument("--last", type=int, default=20, help="how many (default 20)")
    ls.set_defaults(handler=_list)

    d = g.add_parser("pull", help="download a checkpoint, verified against the chain's digest")
    _chain_args(d)
    which = d.add_mutually_exclusive_group()
    which.add_argument("--round", type=int, help="the checkpoint of this round")
    which.add_argument(
        "--latest", action="store_true", help="the highest round published (the default)"
    )
    d.add_argument(
        "--out", required=True, help="destination directory (must not exist or be empty)"
    )
    d.add_argument(
        "--max-bytes", type=parse_size, default="256G", help="refuse a checkpoint larger than this"
    )
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(handler=_pull)

    u = g.add_parser("publish", help="upload a checkpoint directory; prints digest and uri")
    u.add_argument("dir", help="a Hugging Face model directory (flat: no subdirectories)")
    u.add_argument(
        "--store",
        required=True,
        help="file:///DIR | http://HOST:PORT | s3://BUCKET/PREFIX?endpoint=URL",
    )
    u.add_argument("--key", help="key file for the blob server (0x... or sr25519:<secret uri>)")
    u.add_argument("--quiet", action="store_true", help="no progress bars")
    u.set_defaults(handler=_publish)


def _chain_args(p) -> None:
    p.add_argument("--rpc", required=True, help="JSON-RPC URL, e.g. http://127.0.0.1:8545")
    p.add_argument("--registry", required=True, help="address of the deployed registry")


def main(argv: list[str] | None = None) -> int:
    """`python -m moesaic.commands.checkpoint ...`: the group on its own, same errors as cli.main."""
    import argparse

    from moesaic.cli import CliError
    from protocol.ops.logs import quiet_third_party

    parser = argparse.ArgumentParser(prog="moesaic")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["checkpoint", *(sys.argv[1:] if argv is None else argv)])
    quiet_third_party()
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, CliError) as e:
        print(f"moesaic checkpoint: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
