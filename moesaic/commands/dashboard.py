"""`moesaic dashboard`: a web page on 127.0.0.1 showing what the network did and why.

    moesaic dashboard --rpc http://127.0.0.1:8545 --registry 0x... --store http://127.0.0.1:8600 \
        --run runs/devnet --port 8700

Reads the chain (read-only, no key) and the state directories of the roles on this machine:
`--run DIR` finds every miner, validator and merger directory below DIR; `--validator-state`,
`--merger-state` and `--miner-state` name them one by one. uvicorn and starlette load inside
the handler, so `moesaic --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path


def add_sources(p) -> None:
    """The state-directory arguments shared with `moesaic report`."""
    p.add_argument("--run", action="append", default=[], metavar="DIR",
                   help="a run directory: every role state directory below it (repeatable)")  # fmt: skip
    for role in ("validator", "merger", "miner"):
        p.add_argument(f"--{role}-state", action="append", default=[], type=Path, metavar="DIR",
                       help=f"a {role}'s state directory (repeatable)")  # fmt: skip


def dirs_from(args):
    from dashboard.state import RunDirs, discover, merge_dirs

    for d in [*args.run, *args.validator_state, *args.merger_state, *args.miner_state]:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"{d}: no such directory")
    named = RunDirs(
        miner=list(args.miner_state), validator=list(args.validator_state),
        merger=list(args.merger_state),
    )  # fmt: skip
    return merge_dirs(named, *(discover(d) for d in args.run))


def _serve(args) -> int:
    import uvicorn

    from dashboard.app import Source, create_app

    if (args.rpc is None) != (args.registry is None):
        raise ValueError("give --rpc and --registry together (or neither: state directories only)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        # The page names hotkeys and local paths; publishing it is a reverse proxy's decision.
        raise ValueError("--host must be a loopback address; put a reverse proxy in front")
    named = dirs_from(args)  # checks the named directories exist
    source = Source(
        rpc=args.rpc, registry=args.registry, store_uri=args.store, dirs=named,
        run_dirs=list(args.run), label=args.label,
    )  # fmt: skip
    print(f"dashboard on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(
        create_app(source, refresh_s=args.refresh),
        host=args.host, port=args.port, log_level="warning",
    )  # fmt: skip
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "dashboard",
        help="serve a web page of rounds, scores, weights and checkpoints on 127.0.0.1",
        description="Serve the dashboard: rounds and phases from the chain, per-miner scores "
        "with reasons and intervals from validator state, merges from merger state, loss plots "
        "and the checkpoint history. Read-only: needs no key.",
    )
    p.add_argument("--rpc", help="EVM JSON-RPC url of the chain, e.g. http://127.0.0.1:8545")
    p.add_argument("--registry", help="0x address of the MoesaicRegistry")
    p.add_argument("--store", help="store uri, to show whether checkpoints are downloadable")
    add_sources(p)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="port (default 8700)")
    p.add_argument("--refresh", type=int, default=10, help="page reload seconds (0: never)")
    p.add_argument("--label", default="", help="a name shown in the title, e.g. testnet")
    p.set_defaults(handler=_serve)
