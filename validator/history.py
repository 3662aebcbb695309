"""The validator's memory of earlier rounds' deltas, for cross-round copy detection.

After scoring round r the validator stores the sketch (protocol.artifact.sketch) of every valid delta it
read in `state_dir/sketches/<r>.safetensors`; round r' compares its deltas with those of the last
`window` rounds. A sketch is 256 KiB whatever the model size, so the history costs
(miners x window) sketches instead of as many full deltas. Rounds scored before sketches existed
(or under another secret) are sketched from their stored artifacts instead, when still on disk.

The deltas' function fingerprints (protocol.artifact.fingerprint) are kept the same way in
`state_dir/fingerprints/<r>.safetensors`. A fingerprint is taken against the base of its own
round, so one missing from disk is not recomputed (the base may have moved on since); that
delta is then compared by its sketch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from protocol.artifact.delta import DeltaRejected
from protocol.artifact.sketch import Sketch, key_id, load_sketches, save_sketches, sketch
from protocol.round.scoring import Entry
from protocol.round.state import RoundStore

SECRET_FILE = "sketch.secret"

Reader = Callable[[Path, str], Mapping[str, torch.Tensor]]  # (path, sha256) -> tensors


def sketch_file(state_dir: Path, r: int) -> Path:
    return state_dir / "sketches" / f"{r}.safetensors"


def fingerprint_file(state_dir: Path, r: int) -> Path:
    return state_dir / "fingerprints" / f"{r}.safetensors"


def save_round(
    state_dir: Path,
    r: int,
    sketches: Mapping[str, Sketch],
    fingerprints: Mapping[str, Sketch] | None = None,
) -> None:
    """Keep round r's sketches and function fingerprints (hotkey -> Sketch) as later rounds'
    originals."""
    for path, kept in (
        (sketch_file(state_dir, r), sketches),
        (fingerprint_file(state_dir, r), fingerprints),
    ):
        if kept is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_sketches(path, kept)


def _stored(state_dir: Path, q: int, secret: bytes, file=sketch_file) -> dict[str, Sketch] | None:
    """Round q's stored sketches (or fingerprints), or None when there is no usable file
    (missing, damaged or drawn under another secret). A fetched hotkey absent from a usable
    file was rejected."""
    path = file(state_dir, q)
    if not path.is_file():
        return None
    try:
        stored = load_sketches(path)
    except ValueError:
        return None
    kid = key_id(secret)
    return stored if all(s.key_id == kid for s in stored.values()) else None


def load_history(
    state_dir: Path, rounds: RoundStore, r: int, window: int, secret: bytes, read: Reader
) -> dict[str, tuple[Entry, Sketch]]:
    """Originals for round r's copy detection: "round q: hotkey" -> (Entry, sketch) for every
    delta fetched and readable in rounds r-window .. r-1."""
    history = {}
    for q in range(max(0, r - window), r):
        fetched = rounds.load(q).get("fetch", {}).get("fetched", {})
        stored = _stored(state_dir, q, secret)
        for hotkey, f in sorted(fetched.items()):
            if stored is not None:
                sk = stored.get(hotkey)
                if sk is None:
                    continue  # rejected when that round was scored
            else:
                path = state_dir / f["path"]
                if not path.is_file():
                    continue  # pruned by the operator: nothing to compare with
                try:
                    sk = sketch(read(path, f["artifact_sha256"]), secret=secret)
                except DeltaRejected:
                    continue  # never a valid delta, so nobody's original
            name = f"round {q}: {hotkey}"
            history[name] = (Entry(name, f["artifact_sha256"], f["block"], f["tiebreak"]), sk)
    return history


def load_fingerprints(
    state_dir: Path, rounds: RoundStore, r: int, window: int, secret: bytes
) -> dict[str, Sketch]:
    """The stored function fingerprints of rounds r-window .. r-1, named like `load_history`'s
    entries ("round q: hotkey"); rounds without a usable file contribute none."""
    out = {}
    for q in range(max(0, r - window), r):
        stored = _stored(state_dir, q, secret, fingerprint_file) or {}
        fetched = rounds.load(q).get("fetch", {}).get("fetched", {})
        out.update({f"round {q}: {h}": fp for h, fp in sorted(stored.items()) if h in fetched})
    return out
