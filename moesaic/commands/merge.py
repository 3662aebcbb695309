"""`moesaic merge` and `moesaic compose`: turn verified expert deltas into a checkpoint.

    moesaic merge --base DIR --assignment A.json --delta F1 --delta F2 [--weights 1,3]
                  [--method scaled|average|diloco|ties|dare] --out DIR
    moesaic compose --base DIR --task A1.json:F1 --task A2.json:F2 --out DIR

`merge` combines several contributors' deltas of the same experts (one assignment); a --base
that is a merged checkpoint carrying a merge state (protocol.artifact.merge_state: the DiLoCo
outer buffers, the bf16 remainder) is continued from it, and --out carries the new state, so
the command recomputes a merger's checkpoint from chain data (its model card says how); `compose`
stacks deltas of disjoint expert sets, each checked against its own assignment. Every delta is
read with `protocol.artifact.untrusted.read_delta_untrusted` (bound to the base hash and its assignment),
and the result is written with `protocol.artifact.export.export_checkpoint`. torch is imported only
inside the handlers so that `moesaic --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merger.settings import METHODS as DAEMON_METHODS
from merger.settings import MergerSettings

# The merger daemon's methods plus the offline-only ones.
METHODS = (*DAEMON_METHODS, "ties", "dare")
DAEMON = MergerSettings()  # the daemon's defaults are the command's: one source


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"weights must be comma-separated numbers, got {text!r}"
        ) from None


def _task(text: str) -> tuple[Path, Path]:
    """ASSIGNMENT.json:DELTA (split after '.json:' when present, so DELTA may hold ':')."""
    head, sep, tail = text.partition(".json:")
    if sep:
        return Path(head + ".json"), Path(tail)
    head, sep, tail = text.partition(":")
    if not (sep and head and tail):
        raise argparse.ArgumentTypeError(f"expected ASSIGNMENT.json:DELTA_FILE, got {text!r}")
    return Path(head), Path(tail)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, help="HF model dir the deltas start from")
    p.add_argument("--out", required=True, type=Path, help="new checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--dtype", help="dtype of the saved weights (default: the base config's)")


def register(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge several contributors' deltas of the same experts into a checkpoint",
        description="Verify each delta against --base and --assignment, merge them, and "
        "export base + merged delta as a Hugging Face checkpoint.",
    )
    _add_common(p)
    p.add_argument("--assignment", required=True, type=Path, help="assignment JSON of the deltas")
    p.add_argument(
        "--delta",
        required=True,
        action="append",
        type=Path,
        metavar="FILE",
        help="a delta file (repeat for each contributor)",
    )
    p.add_argument(
        "--weights",
        type=_weights,
        metavar="W1,W2,...",
        help="one weight >= 0 per --delta, normalised to sum 1 (default: equal)",
    )
    p.add_argument("--method", choices=METHODS, default=DAEMON.method, help="default: %(default)s")
    p.add_argument(
        "--outer-lr", type=float, default=DAEMON.outer_lr, help="diloco outer lr (%(default)s)"
    )
    p.add_argument(
        "--outer-momentum",
        type=float,
        default=DAEMON.outer_momentum,
        help="diloco Nesterov momentum (%(default)s)",
    )
    p.add_argument(
        "--outer-state",
        type=Path,
        metavar="FILE",
        help="diloco momentum buffers: read if present, written after export",
    )
    p.add_argument(
        "--max-scale", type=float, default=DAEMON.max_scale,
        help="scaled: cap of the sqrt(N_eff) factor (%(default)s)",
    )  # fmt: skip
    p.add_argument("--density", type=float, default=0.2, help="ties: kept fraction (0.2)")
    p.add_argument("--drop", type=float, default=0.9, help="dare: drop probability (0.9)")
    p.add_argument("--seed", type=int, default=0, help="dare: mask seed (0)")
    p.set_defaults(handler=_merge)
    _register_compose(sub)


def _register_compose(sub) -> None:
    c = sub.add_parser(
        "compose",
        help="combine deltas of disjoint expert sets (one per task) into a checkpoint",
        description="Verify each task's delta against --base and its own assignment, take "
        "their union, and export base + union as a Hugging Face checkpoint.",
    )
    _add_common(c)
    c.add_argument(
        "--task",
        required=True,
        action="append",
        type=_task,
        metavar="ASSIGNMENT.json:DELTA",
        help="one task (repeat)",
    )
    c.add_argument(
        "--overlap",
        choices=("error", "average"),
        default="error",
        help="experts in several tasks: refuse (default) or average them",
    )
    c.set_defaults(handler=_compose)


def _layout(base: Path):
    """The base's ExpertLayout from its config alone (meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from protocol.moe.model import expert_layout

    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} has no config.json: not a Hugging Face model directory")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base)))
    return expert_layout(model)


def _read(path: Path, layout, assignment, base_hash: str, seen: dict[str, Path]):
    """Read one untrusted delta bound to `base_hash` and `assignment`: (tensors, provenance)."""
    from protocol.artifact.delta import max_delta_bytes
    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.identity.hashing import sha256_file

    if not path.is_file():
        raise FileNotFoundError(f"delta file {path} does not exist")
    digest = sha256_file(path)
    if digest in seen:
        raise ValueError(f"{path} is the same file as {seen[digest]}: give each delta once")
    seen[digest] = path
    try:
        meta, tensors = read_delta_untrusted(
            path,
            layout=layout,
            assignment=assignment,
            max_bytes=max_delta_bytes(layout, assignment),  # any encoding
            expected_base_hash=base_hash,
            expected_sha256=digest,  # the bytes merged are the bytes recorded
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    record = {
        "file": path.name,
        "sha256": digest,
        "assignment_hash": meta.assignment_hash,
        "round": meta.round,
        "tokens": meta.tokens,
    }
    return tensors, record


def _outer(args, carried):
    """The DiLoCo outer optimizer, lr/momentum from flags: buffers from --outer-state if it
    exists, else the ones the base checkpoint carries (`carried`, its merge state), else none."""
    from protocol.moe.merge import DiLoCoOuter

    if args.outer_state is None or not args.outer_state.exists():
        saved = carried.outer if carried is not None else None
        if saved is None:
            return DiLoCoOuter(lr=args.outer_lr, momentum=args.outer_momentum)
        return DiLoCoOuter(
            lr=args.outer_lr, momentum=args.outer_momentum, nesterov=saved.nesterov,
            steps=saved.steps, buffers=saved.buffers,
        )  # fmt: skip
    saved = DiLoCoOuter.load(args.outer_state)
    if (saved.lr, saved.momentum) != (args.outer_lr, args.outer_momentum):
        print(
            f"note: {args.outer_state} was written with lr {saved.lr}, momentum {saved.momentum}; "
            f"using lr {args.outer_lr}, momentum {args.outer_momentum}"
        )
    return DiLoCoOuter(
        lr=args.outer_lr,
        momentum=args.outer_momentum,
        nesterov=saved.nesterov,
        steps=saved.steps,
        buffers=saved.buffers,
    )


def _merged(args, deltas, carried):
    """Apply --method; returns (merged delta, method parameters, outer optimizer or None)."""
    from protocol.moe import merge

    if args.method == "average":
        return merge.weighted_average(deltas, args.weights), {}, None
    if args.method == "scaled":
        weights = args.weights or [1.0] * len(deltas)
        factor = merge.contributor_scale(weights, args.max_scale)
        merged = merge.scaled(merge.weighted_average(deltas, weights), factor)
        return merged, {"scale": factor, "max_scale": args.max_scale}, None
    if args.method == "ties":
        merged = merge.ties(deltas, args.weights, density=args.density)
        return merged, {"density": args.density}, None
    if args.method == "dare":
        merged = merge.dare(deltas, args.weights, drop=args.drop, seed=args.seed)
        return merged, {"drop": args.drop, "seed": args.seed}, None
    outer = _outer(args, carried)
    update = outer.step(merge.weighted_average(deltas, args.weights))
    params = {"outer_lr": outer.lr, "outer_momentum": outer.momentum, "outer_step": outer.steps}
    return update, params, outer


def _state_after(carried, outer):
    """The merge state --out carries (protocol.artifact.merge_state): the outer optimizer after
    this step, else the base's unchanged, and the base's remainder added back (error feedback);
    None when the base carries none and no outer step was taken (a plain export, as before)."""
    from protocol.artifact.merge_state import MergeState

    if carried is None and outer is None:
        return None
    kept = outer if outer is not None else carried.outer
    return MergeState(kept, carried.residual if carried is not None else {})


def _merge(args) -> int:
    from protocol.artifact.export import export_checkpoint
    from protocol.artifact.merge_state import read_merge_state
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment
    from protocol.moe.merge import normalise_weights
    from protocol.ops.atomic import check_target

    if args.outer_state is not None and args.method != "diloco":
        raise ValueError("--outer-state only applies to --method diloco")
    weights = normalise_weights(args.weights, len(args.delta))  # fail before reading anything
    check_target(args.out, args.overwrite)
    base_hash = sha256_dir(args.base)
    layout = _layout(args.base)
    assignment = Assignment.load(args.assignment)
    seen: dict[str, Path] = {}
    read = [_read(p, layout, assignment, base_hash, seen) for p in args.delta]
    carried = read_merge_state(args.base)  # a merged checkpoint's outer state and remainder
    merged, params, outer = _merged(args, [tensors for tensors, _ in read], carried)
    info = {
        "command": "merge",
        "method": args.method,
        "params": params,
        "assignment_hash": assignment.hash(),
        "weights": weights,
        "deltas": [record for _, record in read],
    }
    digest = export_checkpoint(
        args.base,
        merged,
        args.out,
        dtype=args.dtype,
        info=info,
        overwrite=args.overwrite,
        base_hash=base_hash,
        merge_state=_state_after(carried, outer),
    )
    if outer is not None and args.outer_state is not None:
        outer.save(args.outer_state)  # only once the checkpoint it produced exists
    print(f"{args.out} {digest}")
    return 0


def _compose(args) -> int:
    from protocol.artifact.export import export_checkpoint
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment
    from protocol.moe.merge import compose
    from protocol.ops.atomic import check_target

    check_target(args.out, args.overwrite)
    base_hash = sha256_dir(args.base)
    layout = _layout(args.base)
    seen: dict[str, Path] = {}
    deltas, records = [], []
    for assignment_path, delta_path in args.task:
        assignment = Assignment.load(assignment_path)
        tensors, record = _read(delta_path, layout, assignment, base_hash, seen)
        deltas.append(tensors)
        records.append(record)
    merged = compose(deltas, overlap=args.overlap)
    info = {"command": "compose", "overlap": args.overlap, "deltas": records}
    digest = export_checkpoint(
        args.base,
        merged,
        args.out,
        dtype=args.dtype,
        info=info,
        overwrite=args.overwrite,
        base_hash=base_hash,
    )
    print(f"{args.out} {digest}")
    return 0
