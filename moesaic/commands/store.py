"""`moesaic store`: run the blob server, upload and download verified objects.

    moesaic store serve --root runs/store --port 8765 --allow allow.txt
    moesaic store whoami --key key.txt                  # the identity to put in allow.txt
    moesaic store put runs/d0.safetensors --store http://127.0.0.1:8765 --key key.txt
    moesaic store get URI --sha256 HEX --out in/d0.safetensors --store http://127.0.0.1:8765

A key file holds `0x<64 hex>` (an Ethereum private key) or `sr25519:<secret uri>`; without
--key, MOESAIC_STORE_KEY may hold the same text. Keys are never taken on the command line,
where other users could read them in the process list.
"""

from __future__ import annotations

import functools
import json
import os
import sys


def _storage_errors(handler):
    """StorageError -> ValueError, so cli.main prints one line and exits 2."""

    @functools.wraps(handler)
    def wrapped(args):
        from protocol.storage import StorageError

        try:
            return handler(args)
        except StorageError as e:
            raise ValueError(str(e)) from e

    return wrapped


def signer_from_args(args):
    from protocol.storage.auth import load_signer

    if args.key:
        with open(args.key) as f:
            return load_signer(f.read())
    if spec := os.environ.get("MOESAIC_STORE_KEY"):
        return load_signer(spec)
    return None


def store_from_args(args, signer=None):
    from protocol.storage import open_store

    options = {"signer": signer} if args.store.startswith(("http://", "https://")) else {}
    return open_store(args.store, **options)


def _serve(args) -> int:
    from protocol.storage.claims import Quota
    from protocol.storage.guard import ConnectionLimits
    from protocol.storage.server import serve

    serve(
        args.root,
        host=args.host,
        port=args.port,
        allow_file=args.allow,
        max_bytes=args.max_bytes,
        quota=Quota(max_bytes=args.quota_bytes, max_objects=args.quota_objects),
        limits=ConnectionLimits(
            header_timeout_s=args.header_timeout,
            stall_timeout_s=args.stall_timeout,
            max_connections=args.max_connections,
        ),
    )
    return 0


@_storage_errors
def _put(args) -> int:
    ref = store_from_args(args, signer_from_args(args)).put(
        args.file, name=args.name, progress=not args.quiet
    )
    print(json.dumps({"sha256": ref.sha256, "size": ref.size, "uri": ref.uri}))
    return 0


@_storage_errors
def _get(args) -> int:
    path = store_from_args(args).get(
        args.uri,
        args.out,
        expected_sha256=args.sha256,
        max_bytes=args.max_bytes,
        progress=not args.quiet,
        resume=not args.no_resume,
    )
    if not args.quiet:
        print(path)
    return 0


def _whoami(args) -> int:
    signer = signer_from_args(args)
    if signer is None:
        raise ValueError("give --key FILE or set MOESAIC_STORE_KEY")
    print(signer.identity)
    return 0


def parse_size(text: str) -> int:
    """Bytes from `123`, `64K`, `512M`, `8G`, `1T` (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def register(sub) -> None:
    p = sub.add_parser("store", help="artifact storage: blob server, verified put/get")
    g = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    s = g.add_parser("serve", help="run the content-addressed blob server")
    s.add_argument("--root", required=True, help="directory holding the objects")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--allow", help="file of identities (0x address / ss58) allowed to write")
    s.add_argument("--max-bytes", type=parse_size, default="256G", help="largest accepted object")
    s.add_argument(
        "--quota-bytes",
        type=parse_size,
        default="1T",
        help="bytes one identity may hold (each object it uploaded counts in full; 413 past it)",
    )
    s.add_argument(
        "--quota-objects", type=int, default=10_000, help="objects one identity may hold"
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a complete request head before it is cut off",
    )
    s.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="seconds a request body (or a response's reader) may make no progress",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="connections served at once; past it the oldest idle one is closed, else 503",
    )
    s.set_defaults(handler=_serve)

    u = g.add_parser("put", help="upload a file; prints its sha256, size and uri as JSON")
    u.add_argument("file")
    u.add_argument(
        "--store",
        required=True,
        help="file:///DIR | http://HOST:PORT | s3://BUCKET/PREFIX?endpoint=URL",
    )
    u.add_argument("--key", help="key file (0x... Ethereum key or sr25519:<secret uri>)")
    u.add_argument("--name", help="a label carried in the uri's #fragment")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(handler=_put)

    d = g.add_parser("get", help="download an object, verified before it is renamed into place")
    d.add_argument("uri", help="object uri or sha256")
    d.add_argument("--sha256", required=True, help="expected digest of the bytes")
    d.add_argument("--out", required=True, help="destination file")
    d.add_argument("--store", required=True)
    d.add_argument("--max-bytes", type=parse_size, default="256G", help="refuse anything larger")
    d.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.part")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(handler=_get)

    w = g.add_parser("whoami", help="print the identity of a key (what the allow-list holds)")
    w.add_argument("--key", help="key file")
    w.set_defaults(handler=_whoami)


def main(argv: list[str] | None = None) -> int:
    """`python -m moesaic.commands.store ...`: the group on its own, same errors as cli.main."""
    import argparse

    parser = argparse.ArgumentParser(prog="moesaic")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["store", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"moesaic store: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
