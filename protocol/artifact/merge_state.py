"""The merge state a checkpoint carries: the DiLoCo outer optimizer and the bf16 remainder.

    state = read_merge_state(base_dir)            # None when the base carries none
    export_checkpoint(base_dir, delta, out, merge_state=MergeState(outer, state.residual))

One safetensors file, MERGE_STATE_FILE, inside the exported checkpoint directory, so it is part
of the checkpoint's digest (protocol.identity.hashing.sha256_dir) and travels with it through
the store: the next round's merge reads it from ITS base checkpoint, and a merger that starts on
an empty state directory, or another merger, continues the same outer trajectory from chain
data alone. transformers never opens the file (it loads model.safetensors or the index).

Tensors: "outer/<hub key>" the outer momentum buffers (protocol.moe.merge.DiLoCoOuter),
"residual/<hub key>" the float32 remainder of the last export into a low-precision base (exact
base + update minus its rounded value; export_checkpoint adds it into the next export, error
feedback, so updates below half a bf16 ulp accumulate instead of rounding away). Metadata
"moesaic" (JSON): format, version, and the outer optimizer's hyperparameters and step count
(null without one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save

from protocol.moe.merge import DiLoCoOuter, read_versioned

MERGE_STATE_FILE = "moesaic-merge-state.safetensors"
MERGE_STATE_FORMAT = "moesaic-merge-state"
MERGE_STATE_VERSION = 1
METADATA_KEY = "moesaic"
OUTER, RESIDUAL = "outer/", "residual/"


@dataclass
class MergeState:
    """The outer optimizer (None: method "average", or no step taken yet) and the remainder."""

    outer: DiLoCoOuter | None = None
    residual: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The file's bytes: deterministic for the same state (keys sorted, metadata sorted)."""
        tensors = {}
        if self.outer is not None:
            tensors.update({OUTER + k: v for k, v in self.outer.buffers.items()})
        tensors.update({RESIDUAL + k: v for k, v in self.residual.items()})
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        meta = {"format": MERGE_STATE_FORMAT, "format_version": MERGE_STATE_VERSION}
        meta["outer"] = None if self.outer is None else _outer_meta(self.outer)
        return save(dict(sorted(tensors.items())), metadata={METADATA_KEY: _json(meta)})


def _outer_meta(outer: DiLoCoOuter) -> dict:
    return dict(lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov, steps=outer.steps)


def _json(x) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def read_merge_state(checkpoint_dir: str | Path) -> MergeState | None:
    """The state a checkpoint directory carries, or None when it has no MERGE_STATE_FILE (the
    task's original base, or a checkpoint exported without one). A malformed file raises
    ValueError naming it: a checkpoint the chain names is not silently restarted from zero."""
    path = Path(checkpoint_dir) / MERGE_STATE_FILE
    if not path.is_file():
        return None
    meta, tensors = read_versioned(path, "merge state", MERGE_STATE_FORMAT, MERGE_STATE_VERSION)
    unknown = sorted(k for k in tensors if not k.startswith((OUTER, RESIDUAL)))
    if unknown:
        raise ValueError(f"{path}: tensors outside {OUTER!r} and {RESIDUAL!r}: {unknown[:3]}")
    bad = sorted(k for k, t in tensors.items() if not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"{path}: non-finite values in {bad[:3]}")
    part = lambda prefix: {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}  # noqa: E731
    outer = None
    if meta.get("outer") is not None:
        o = meta["outer"]
        outer = DiLoCoOuter(
            lr=float(o["lr"]), momentum=float(o["momentum"]), nesterov=bool(o["nesterov"]),
            steps=int(o["steps"]), buffers=part(OUTER),
        )  # fmt: skip
    elif part(OUTER):
        raise ValueError(f"{path}: outer buffers without outer hyperparameters")
    return MergeState(outer=outer, residual=part(RESIDUAL))
