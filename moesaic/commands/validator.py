"""`moesaic validator explain`: every miner's score, weight and reason for a round."""

from __future__ import annotations

from moesaic.commands.roles import add_run


def _explain(args) -> int:
    from validator.explain import explain_state, format_explain

    state_dir = args.state_dir
    if state_dir is None:  # the validator's own config says where its state is
        from moesaic.config import load_config

        state_dir = load_config(args.config).role("validator").state_dir
    rows = explain_state(state_dir, args.round)
    print(f"round {args.round}: {len(rows)} miners")
    print(format_explain(rows))
    return 0


def register(sub) -> None:
    p = sub.add_parser("validator", help="validator tools")
    g = p.add_subparsers(dest="validator_command", metavar="ACTION", required=True)
    e = g.add_parser("explain", help="why each miner got its score and weight in a round")
    e.add_argument("--round", type=int, required=True)
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the validator's TOML config (its [validator] state_dir)")
    where.add_argument("--state-dir", help="the validator's state directory")
    e.set_defaults(handler=_explain)
    add_run(g, "validator")
