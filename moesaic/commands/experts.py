"""`moesaic experts select`: ESFT expert selection for a domain."""

from __future__ import annotations


def _select(args) -> int:
    from protocol.moe.experts import Assignment
    from protocol.moe.selection import select_experts

    a = select_experts(
        args.model,
        args.data,
        method=args.method,
        p=args.p,
        tokens=args.tokens,
        seq_len=args.seq_len,
        device=args.device,
        progress=not args.quiet,
        exclude=tuple(Assignment.load(path) for path in args.exclude),
    )
    a.save(args.out)
    info = a.info
    print(f"{'layer':>5} {'selected':>8} {'coverage':>8}  experts")
    for layer, experts in sorted(a.layers.items()):
        cov = info["coverage"][str(layer)]
        print(f"{layer:>5} {len(experts):>8} {cov:>8.3f}  {','.join(map(str, experts))}")
    share = a.num_selected() / (len(a.layers) * a.num_experts)
    print(
        f"{a.num_selected()} experts ({share:.1%} of {len(a.layers)}x{a.num_experts}) by {a.method} "
        f"p={a.p} on {info['tokens']:,} tokens; hash {a.hash()[:16]} -> {args.out}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("experts", help="expert selection")
    g = p.add_subparsers(dest="experts_command", metavar="ACTION", required=True)
    s = g.add_parser("select", help="select a domain's experts (ESFT token-ratio or gate-score)")
    s.add_argument("--model", required=True, help="base model directory (or hub id)")
    s.add_argument("--data", required=True, help="data spec of the domain, e.g. corpus:math")
    s.add_argument("--method", choices=("token-ratio", "gate-score"), default="token-ratio")
    s.add_argument(
        "--p",
        type=float,
        default=None,
        help="cumulative threshold (default 0.2 token-ratio, 0.1 gate-score)",
    )
    s.add_argument("--tokens", type=int, default=131072, help="domain tokens to route (ESFT: 2^17)")
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--device", default="auto")
    s.add_argument(
        "--exclude", action="append", default=[], metavar="ASSIGNMENT",
        help="another task's assignment whose experts this task must not take (repeatable): "
        "tasks with disjoint experts compose into one checkpoint",
    )  # fmt: skip
    s.add_argument("--out", required=True, help="assignment JSON to write")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(handler=_select)
