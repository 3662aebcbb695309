"""`moesaic miner train`: train a task's experts locally and write the delta artifact.

Its flags are LocalJob's fields and those of its TrainSettings (protocol.config.add_flags), so
names, types, defaults and help are the ones `[miner.train]` and the miner use.
"""

from __future__ import annotations

from miner.local import JOB_INTERNAL, LocalJob
from moesaic.commands.roles import add_run
from protocol.config import add_flags, from_flags


def _train(args) -> int:
    from miner.local import run_local

    job = from_flags(LocalJob, args)
    if args.world_size > 1:
        from miner.distributed import run_distributed
        from protocol.moe.model import pick_device

        backend = "nccl" if pick_device(job.train.device).startswith("cuda") else "gloo"
        s = run_distributed(job, args.world_size, backend, progress=not args.quiet)
    else:
        s = run_local(job, progress=not args.quiet)
    print(
        f"trained {s['tokens']:,} tokens at {s['tokens_per_s']:.0f} tok/s, loss {s['first_loss']:.3f} -> "
        f"{s['last_loss']:.3f}; delta {s['bytes']:,} bytes sha256 {s['sha256']} -> {s['out']}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("miner", help="miner tools")
    g = p.add_subparsers(dest="miner_command", metavar="ACTION", required=True)
    t = g.add_parser(
        "train",
        help="train only the assigned experts and write their delta",
        description="A one-off job keeps no error-feedback residual for a lossy --encoding.",
    )
    add_flags(t, LocalJob, exclude=JOB_INTERNAL)
    t.add_argument(
        "--world-size", type=int, default=1, help="data-parallel FSDP2 processes on this host"
    )
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(handler=_train)
    add_run(g, "miner")
