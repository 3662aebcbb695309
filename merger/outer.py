"""The DiLoCo outer optimizer across rounds: which state a round steps from, and which state
its checkpoint carries (protocol.artifact.merge_state). Read from the round's base checkpoint
first, so a merger on an empty state directory continues the same trajectory from chain data.
"""

from __future__ import annotations

from pathlib import Path

from protocol.artifact.merge_state import read_merge_state
from protocol.moe.merge import DiLoCoOuter


def outer_before(state_dir: Path, r: int, base_dir: Path, lr: float, momentum: float):
    """The DiLoCo state round r steps from, with this merger's `lr` and `momentum`: the one
    the round's base checkpoint carries; for a base that carries no merge state (the task's
    base) the latest earlier round's local `state_dir/outer/<q>.safetensors`; else fresh."""
    carried = read_merge_state(base_dir)
    if carried is not None:
        saved = carried.outer
    else:
        folder = Path(state_dir) / "outer"
        stems = [p.stem for p in folder.glob("*.safetensors") if p.stem.isdigit()]
        earlier = sorted((int(x) for x in stems if int(x) < r), reverse=True)
        saved = DiLoCoOuter.load(folder / f"{earlier[0]}.safetensors") if earlier else None
    if saved is None:
        return DiLoCoOuter(lr=lr, momentum=momentum)
    return DiLoCoOuter(
        lr=lr, momentum=momentum, nesterov=saved.nesterov, steps=saved.steps,
        buffers=saved.buffers,
    )  # fmt: skip


def outer_published(state_dir: Path, r: int, base_dir: Path, lr: float, momentum: float):
    """The outer state round r's checkpoint carries: after r's step (`state_dir/outer/<r>`),
    else its base's, unchanged by a round that published a single delta; None before any step."""
    stepped = Path(state_dir) / "outer" / f"{r}.safetensors"
    if stepped.is_file():
        return DiLoCoOuter.load(stepped)
    outer = outer_before(state_dir, r, base_dir, lr, momentum)
    return outer if outer.steps > 0 else None
