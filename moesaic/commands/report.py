"""`moesaic report --out DIR`: PNG plots of a run (the cumulative curve, loss per round, scores).

    moesaic report --run runs/devnet --out runs/devnet/report
    moesaic report --validator-state runs/validator --merger-state runs/merger --out report/
    moesaic report --run runs/devnet --summary runs/devnet/summary.json --out report/

Reads the roles' state directories (and, with --rpc/--registry, the chain's weights and
checkpoints into snapshot.json), and a devnet summary's cumulative curve (network vs solo vs
the original base on one fixed held-out set) from --summary or the run directory
(summary/summary.json). matplotlib loads inside the handler.
"""

from __future__ import annotations

from pathlib import Path

from moesaic.commands.dashboard import add_sources, dirs_from


def _report(args) -> int:
    from dashboard.report import write_report
    from dashboard.state import read_curve, snapshot

    dirs = dirs_from(args)
    if not any(path for _role, path in dirs.all()) and args.summary is None:
        raise ValueError(
            "no miner, validator or merger state directory found, and no --summary; see --help"
        )
    chain = None
    if args.rpc or args.registry:
        if not (args.rpc and args.registry):
            raise ValueError("give --rpc and --registry together")
        from protocol.chain.evm import EvmChain

        chain = EvmChain(args.rpc, args.registry, None)
    if args.summary is not None and not args.summary.is_file():
        raise FileNotFoundError(f"--summary {args.summary}: no such file")
    curve = read_curve([*([args.summary] if args.summary else []), *args.run])
    if args.summary is not None and curve is None:
        raise ValueError(f"--summary {args.summary}: no curve in it (a moesaic devnet summary)")
    snap = snapshot(chain, dirs, curve=curve)
    for path in write_report(snap, args.out):
        print(path)
    for problem in snap["problems"]:
        print(f"warning: {problem}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write PNG plots of a run (loss per round, score distribution) from state dirs",
    )
    add_sources(p)
    p.add_argument("--rpc", help="optional: EVM JSON-RPC url, adds weights and checkpoints")
    p.add_argument("--registry", help="optional: the MoesaicRegistry address (with --rpc)")
    p.add_argument(
        "--summary", type=Path, metavar="PATH",
        help="a moesaic devnet summary JSON with the cumulative curve (default: the run "
        "directory's summary/summary.json, when there is one)",
    )  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="directory for the PNGs")
    p.set_defaults(handler=_report)
