"""`moesaic miner train`: train a task's experts locally and write the delta artifact."""

from __future__ import annotations

from moesaic.commands.roles import add_run
from protocol.artifact.encodings import encoding_arg


def _train(args) -> int:
    from miner.local import LocalJob, run_local

    job = LocalJob(
        model=args.model,
        assignment=args.assignment,
        data=args.data,
        out=args.out,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        round=args.round,
        seed=args.seed,
        device=args.device,
        encoding=args.encoding,
        gradient_checkpointing=args.gradient_checkpointing,
        loss_chunk=args.loss_chunk,
    )
    if args.world_size > 1:
        from miner.distributed import run_distributed
        from protocol.moe.model import pick_device

        backend = "nccl" if pick_device(args.device).startswith("cuda") else "gloo"
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
    t = g.add_parser("train", help="train only the assigned experts and write their delta")
    t.add_argument("--model", required=True, help="base model directory")
    t.add_argument(
        "--assignment", required=True, help="assignment JSON from `moesaic experts select`"
    )
    t.add_argument(
        "--data", required=True, help="data spec, e.g. corpus:math (its train split is used)"
    )
    t.add_argument("--out", required=True, help="delta .safetensors to write")
    t.add_argument("--steps", type=int, default=100, help="inner steps H")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--max-tokens", type=int, default=2_000_000, help="training tokens to load")
    t.add_argument("--round", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    t.add_argument(
        "--encoding",
        type=encoding_arg,
        default="float32",
        help="float32, bfloat16, float16, int8, lowrank<R> or lowrank<R>-int8 (e.g. lowrank8); "
        "a one-off job keeps no error-feedback residual",
    )
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in backward: less memory, slower steps",
    )
    t.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        metavar="TOKENS",
        help="LM head + loss over this many tokens at a time, never the full [tokens, vocab] "
        "logits (0: off; single process only)",
    )
    t.add_argument(
        "--world-size", type=int, default=1, help="data-parallel FSDP2 processes on this host"
    )
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(handler=_train)
    add_run(g, "miner")
