"""`moesaic artifact`: check and look inside expert-delta files.

    moesaic artifact verify DELTA --assignment A.json --base DIR [--round N] [--sha256 HEX]
    moesaic artifact inspect DELTA

`verify` runs the validator's untrusted loader (protocol.artifact.untrusted.read_delta_untrusted) against the
base's layout and hash: exit 0 and one "OK ..." line, or exit 1 and "REJECTED <code>: ..." on
stderr. Only the base's config is loaded (the model is built on the meta device), so verifying
needs no memory for weights; the base hash still reads every weight file once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub) -> None:
    group = sub.add_parser("artifact", help="verify or inspect expert-delta files")
    cmds = group.add_subparsers(dest="artifact_command", metavar="ACTION", required=True)

    verify = cmds.add_parser(
        "verify", help="validate a delta as a validator would (exit 1 if rejected)"
    )
    verify.add_argument("file", help="delta .safetensors file")
    verify.add_argument("--assignment", required=True, help="assignment JSON the delta must cover")
    verify.add_argument(
        "--base", required=True, help="base model directory the delta must be trained on"
    )
    verify.add_argument("--round", type=int, default=None, help="require this round number")
    verify.add_argument(
        "--hotkey",
        default=None,
        help="require the committer's shard: the delta must declare shard_key(--task-id, "
        "HOTKEY, --round) (needs --round)",
    )
    verify.add_argument(
        "--task-id", type=int, default=0, help="the task of the --hotkey shard check (default 0)"
    )
    verify.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="refuse larger files (default: the largest well-formed delta for the assignment)",
    )
    verify.add_argument("--sha256", default=None, help="require the file's exact sha256 (hex)")
    verify.set_defaults(handler=_verify)

    inspect = cmds.add_parser(
        "inspect", help="print a delta's metadata and experts (no validation)"
    )
    inspect.add_argument("file", help="delta .safetensors file")
    inspect.set_defaults(handler=_inspect)


def _base_layout(base: str):
    """The base's ExpertLayout from its config alone: the model is built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from protocol.moe.model import expert_layout

    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{base} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return expert_layout(model)


def _verify(args) -> int:
    from protocol.artifact.delta import DeltaRejected, max_delta_bytes
    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.identity.hashing import sha256_dir, sha256_file
    from protocol.moe.experts import Assignment

    if not Path(args.assignment).is_file():
        raise FileNotFoundError(f"assignment file {args.assignment} not found")
    if not Path(args.file).exists():
        raise FileNotFoundError(f"delta file {args.file} not found")
    assignment = Assignment.load(args.assignment)
    layout = _base_layout(args.base)
    max_bytes = (
        args.max_bytes if args.max_bytes is not None else max_delta_bytes(layout, assignment)
    )
    shard = None
    if args.hotkey is not None:
        from protocol.round.shards import shard_key

        if args.round is None:
            raise ValueError("--hotkey checks the round's shard: give --round too")
        shard = shard_key(args.task_id, args.hotkey, args.round)
    try:
        meta, tensors = read_delta_untrusted(
            args.file,
            layout=layout,
            assignment=assignment,
            max_bytes=max_bytes,
            expected_base_hash=sha256_dir(args.base),
            expected_round=args.round,
            expected_shard=shard,
            expected_sha256=args.sha256,
        )
    except DeltaRejected as e:
        print(f"REJECTED {e.code}: {e.message}", file=sys.stderr)
        return 1
    experts = len({key.rsplit(".", 2)[0] for key in tensors})  # one entry per (layer, expert)
    size = os.path.getsize(args.file)
    print(f"OK {sha256_file(args.file)} experts={experts} bytes={size} round={meta.round}")
    return 0


def _inspect(args) -> int:
    from protocol.artifact.delta import DeltaMeta, DeltaRejected
    from protocol.artifact.untrusted import read_header_untrusted

    if not Path(args.file).exists():
        raise FileNotFoundError(f"delta file {args.file} not found")
    try:
        header, data_len = read_header_untrusted(args.file)
    except DeltaRejected as e:
        print(f"REJECTED {e.code}: {e.message}", file=sys.stderr)
        return 1
    print(f"file: {args.file}")
    print(f"bytes: {os.path.getsize(args.file)} (data {data_len})")
    md = header.get("__metadata__")
    try:
        meta = DeltaMeta.from_json(md["moesaic"])
        for name, value in meta.__dict__.items():
            print(f"{name}: {value}")
    except (ValueError, TypeError, KeyError) as e:
        # Inspection shows what is there even when it would not pass verification.
        print(f"metadata (invalid: {_shown(str(e)[:200])}): {_shown(str(md)[:500])}")
    for line in _tensor_lines(header):
        print(line)
    return 0


def _shown(text: str) -> str:
    """Text from a hostile header made safe to print: a lone surrogate would crash the UTF-8
    stream and an ANSI escape would drive the reader's terminal, so those come out escaped."""
    return text if text.isprintable() else ascii(text)


def _tensor_lines(header: dict) -> list[str]:
    """Per-layer expert lists; experts lacking a projection and non-expert keys are flagged."""
    from protocol.artifact.delta import parse_expert_key
    from protocol.artifact.encodings import hub_key_of
    from protocol.moe.model import EXPERT_PROJS

    layers: dict[int, dict[int, set[str]]] = {}
    dtypes, others = set(), []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        parsed = parse_expert_key(hub_key_of(key))  # int8 scales, low-rank factors: their key
        if parsed is None:
            others.append(_shown(key))
            continue
        _, layer, expert, proj = parsed
        layers.setdefault(layer, {}).setdefault(expert, set()).add(proj)
        dtypes.add(_shown(str(entry.get("dtype"))) if isinstance(entry, dict) else "?")
    lines = [
        f"tensors: {len(header) - ('__metadata__' in header)} dtypes: {','.join(sorted(dtypes)) or '-'}"
    ]
    for layer in sorted(layers):
        parts = []
        for expert, projs in sorted(layers[layer].items()):
            lacking = [p for p in EXPERT_PROJS if p not in projs]
            parts.append(f"{expert}(missing {'+'.join(lacking)})" if lacking else str(expert))
        lines.append(f"layer {layer}: {len(parts)} experts: {' '.join(parts)}")
    if others:
        lines.append(f"non-expert keys ({len(others)}): {', '.join(sorted(others)[:10])}")
    return lines
