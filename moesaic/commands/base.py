"""`moesaic base build`: a small Qwen3-MoE pre-trained on real offline text."""

from __future__ import annotations


def _build(args) -> int:
    from protocol.moe.demo_base import build_base

    report = build_base(
        args.out, args.preset, seed=args.seed, progress=not args.quiet, steps=args.steps
    )
    print(f"built {args.preset} base in {report['seconds']} s -> {args.out}")
    print(
        f"params {report['params']:,}  pretrain tokens {report['pretrain_tokens']:,}  "
        f"final train loss {report['final_train_loss']:.3f}"
    )
    print("routing concentration (mean experts per layer ESFT selects; fewer = more specialised):")
    print(f"  {'domain':<8} {'p=0.2':>6} {'p=0.5':>6} {'uniform p=0.2':>14}")
    for domain, r in report["routing"].items():
        if domain != "jaccard_p0.2":
            print(
                f"  {domain:<8} {r['experts_p0.2']:>6.1f} {r['experts_p0.5']:>6.1f} {r['uniform_p0.2']:>14.1f}"
            )
    overlaps = ", ".join(f"{k} {v:.2f}" for k, v in report["routing"]["jaccard_p0.2"].items())
    print(f"  overlap of selections (Jaccard, p=0.2): {overlaps}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("base", help="build a demo base model")
    g = p.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    b = g.add_parser(
        "build", help="train a tokenizer and pre-train a small Qwen3-MoE on prose + code"
    )
    b.add_argument("--out", required=True, help="new directory for the HF model")
    b.add_argument(
        "--preset",
        choices=("test", "tiny"),
        default="tiny",
        help="test: seconds; tiny: the demo base",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--steps", type=int, default=None, help="override the preset's pre-training steps"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(handler=_build)
