"""`moesaic devnet`: the whole network on this machine, R rounds, then a summary.

    moesaic devnet --rounds 3 --out runs/devnet --json-summary runs/devnet/summary.json

Starts anvil with the registry, the blob server, 3 honest miners beside issue 15's cheaters (a
lazy miner, a sybil copier, a front-runner, a deleter and an eval-pool trainer), 2 honest
validators, a colluding one and a weight-copying one, and a merger, each its own process on 127.0.0.1
(moesaic/devnet/run.py). Exit code 0 when the merged checkpoint improved the domain loss within
the general tolerance, no cheater earned consensus weight or got a delta merged (the eval-pool
trainer may earn, no more than honest work) and nothing was deleted; 1 otherwise. SIGTERM or
Ctrl-C stops every process it started (by pid) and exits 128 + the signal's number (143, 130).
"""

from __future__ import annotations

import argparse


def _run(args) -> int:
    from moesaic.devnet.run import DevnetOptions, run_devnet

    opts = DevnetOptions(
        rounds=args.rounds,
        out=args.out,
        preset=args.preset,
        block_s=args.block_s,
        patience_s=args.patience_s,
        json_summary=args.json_summary,
        live=not args.quiet,
        timeout_s=args.timeout_s,
        overrides=tuple(args.overrides),
        dashboard=not args.no_dashboard,
        cheaters=tuple(c for c in args.cheaters.split(",") if c),
        dishonest_validators=args.dishonest_validators,
        snapshot=args.dashboard_snapshot,
        solo=not args.no_solo,
        **({"config": args.config} if args.config else {}),
    )
    return run_devnet(opts)


def register(sub) -> None:
    p = sub.add_parser(
        "devnet", help="run the whole network locally (anvil, blob server, every role)"
    )
    p.add_argument("--rounds", type=int, default=8, help="rounds to run (default 8)")
    p.add_argument("--out", default="runs/devnet", help="run directory (default runs/devnet)")
    p.add_argument(
        "--preset", choices=["test", "tiny"], default="tiny",
        help="demo base: tiny (3.9M parameters, learns for 8+ rounds; built once, ~2.5 min "
        "on 2 cores, then reused from --out) or test (48K, seconds to build; what CI runs)",
    )  # fmt: skip
    p.add_argument(
        "--config", help="role config every process starts from (default: the preset's, "
        "configs/devnet.toml for tiny, configs/devnet-test.toml for test)",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value for every process, e.g. miner.train.steps=32",
    )  # fmt: skip
    p.add_argument("--block-s", type=float, default=0.25, help="seconds per block (0.25)")
    p.add_argument(
        "--patience-s", type=float, default=900.0,
        help="longest the block clock waits at a phase end for a slow process",
    )  # fmt: skip
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up after this long")
    p.add_argument("--json-summary", metavar="PATH", help="also write the summary as JSON")
    p.add_argument(
        "--cheaters", default="lazy,copier,frontrunner,deleter,evalpool",
        help="comma-separated cheating miners beside the 3 honest ones: lazy, copier, frontrunner, "
        "deleter, evalpool, copycat, general_harm, nan_some "
        "(default lazy,copier,frontrunner,deleter,evalpool)",
    )  # fmt: skip
    p.add_argument(
        "--dishonest-validators", action=argparse.BooleanOptionalAction, default=None,
        help="beside the 2 honest validators, one giving all its weight to the lazy miner and "
        "one revealing validator0's previous weights (default: on when the lazy miner runs)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no live view")
    p.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard")
    p.add_argument(
        "--no-solo", action="store_true",
        help="skip the solo baseline (one honest miner alone, trained after the rounds)",
    )  # fmt: skip
    p.add_argument(
        "--dashboard-snapshot", metavar="DIR",
        help="at the end, save the dashboard page (HTML and a headless-Chromium PNG) in DIR",
    )  # fmt: skip
    p.set_defaults(handler=_run)
