"""Error feedback for lossy delta encodings: what the wire dropped is sent in a later round.

With a lossy encoding (int8, lowrank<R>, lowrank<R>-int8; protocol.artifact.encodings) validators
receive decode(encode(delta)), not the delta. The miner keeps what was dropped and adds it to
its next delta before encoding (Seide et al. 2014; Karimireddy et al. 2019; the benchmark's
in-memory version is scripts.compress.ErrorFeedback):

    corrected_r = delta_r + residual_p        p: the latest earlier round that left a residual
    sent_r      = decode(encode(corrected_r))  (protocol.artifact.delta.wire_roundtrip)
    residual_r  = corrected_r - sent_r

so over rounds sum(sent) = sum(delta) - residual: nothing trained is lost, only delayed.

Residuals live beside the miner's round state as `<round>.residual.safetensors` (float32
under the hub keys, written atomically after the delta) and are keyed by the round they were
produced for. A round re-run after a crash (retrained because it was never recorded) reads
the residual of the latest round before it, never its own, and so writes the same bytes. A
residual made for another assignment (its hash differs) is dropped with a log line: its keys
name other experts, or the same experts of another task. Lossless encodings (float32,
bfloat16, float16) keep no residual and ignore any left by earlier lossy rounds.

A residual of a round whose delta was never committed is dropped before the next round trains
(`drop_unsent`, called by the miner node): nothing of that round reached anyone.

`corrected` and `residual_of` are the pure core; `ResidualStore` the files; `write_with_feedback`
what miner.local.write_job_delta calls.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from protocol.artifact.delta import decode_delta, encode_delta, write_delta, write_encoded
from protocol.artifact.encodings import parse_encoding
from protocol.identity.hashing import canonical_json
from protocol.ops.atomic import remove_stale_temps, write_bytes_atomic

log = logging.getLogger("moesaic.miner")

RESIDUAL_SUFFIX = ".residual.safetensors"
METADATA_KEY = "moesaic-residual"
_NAME = re.compile(r"^(0|[1-9][0-9]*)" + re.escape(RESIDUAL_SUFFIX) + "$")

Delta = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- pure core


def corrected(delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]) -> Delta:
    """delta + residual in float32 on the CPU, for delta's keys (a residual key the delta
    lacks is not shippable and is left out; callers drop mismatched residuals first)."""
    out = {}
    for key, t in delta.items():
        x = t.detach().to(device="cpu", dtype=torch.float32)
        r = residual.get(key)
        out[key] = x + r.to(torch.float32) if r is not None else x.clone()
    return out


def residual_of(corrected: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> Delta:
    """What the encoding dropped: corrected - sent, per key (float32)."""
    return {key: (corrected[key].float() - sent[key].float()).contiguous() for key in corrected}


def fits(residual: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> str | None:
    """Why `residual` cannot be added to `delta` (other keys or shapes), or None."""
    if set(residual) != set(delta):
        return f"its {len(residual)} keys are not the delta's {len(delta)}"
    for key, t in delta.items():
        if tuple(residual[key].shape) != tuple(t.shape):
            return f"{key}: shape {tuple(residual[key].shape)}, delta has {tuple(t.shape)}"
    return None


# ----------------------------------------------------------------------------- the files


class ResidualStore:
    """The residual files `<round>.residual.safetensors` in one directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def path(self, rnd: int) -> Path:
        return self.dir / f"{rnd}{RESIDUAL_SUFFIX}"

    def rounds(self) -> list[int]:
        """Rounds that have a residual file, ascending."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m[1]) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def previous(self, rnd: int) -> int | None:
        """The latest round before `rnd` with a residual file."""
        earlier = [q for q in self.rounds() if q < rnd]
        return earlier[-1] if earlier else None

    def load(self, rnd: int) -> tuple[dict, Delta]:
        """(metadata, residual) of round `rnd`'s file (ours: safetensors, never a pickle)."""
        path = self.path(rnd)
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
        return meta, load_file(str(path))

    def save(self, rnd: int, residual: Delta, *, assignment_hash: str, encoding: str) -> None:
        meta = {"round": rnd, "assignment_hash": assignment_hash, "encoding": encoding}
        data = save(dict(residual), metadata={METADATA_KEY: canonical_json(meta).decode()})
        remove_stale_temps(self.path(rnd))  # a kill mid-write left one; this dir is ours
        write_bytes_atomic(self.path(rnd), data)

    def prune(self, keep_from: int) -> None:
        """Remove residual files of rounds before `keep_from`."""
        for q in self.rounds():
            if q < keep_from:
                self.path(q).unlink(missing_ok=True)


def drop_unsent(store: ResidualStore, rnd: int, never_sent: Callable[[int], bool]) -> list[int]:
    """Remove the residuals of the latest rounds before `rnd` whose delta never reached the
    validators (`never_sent(q)`: not committed and too late to be); the rounds removed.

    Such a residual is what an encoding dropped from a delta nobody received: carrying it would
    ship part of a lost delta and only part of what was owed before it. Without it, the latest
    residual is again the one of the last round that was sent, which is owed in full.
    """
    dropped = []
    for q in reversed([q for q in store.rounds() if q < rnd]):
        if not never_sent(q):
            break
        store.path(q).unlink(missing_ok=True)
        dropped.append(q)
        log.warning("round %d: residual of round %d dropped: that round's delta was never "
                    "committed", rnd, q)  # fmt: skip
    return dropped


def previous_residual(
    store: ResidualStore, rnd: int, assignment_hash: str, delta: Mapping[str, torch.Tensor]
) -> tuple[int | None, Delta]:
    """(its round, the residual) to add to round `rnd`'s delta: the latest earlier round's,
    or (round or None, {}) when there is none or it does not apply (logged)."""
    q = store.previous(rnd)
    if q is None:
        return None, {}
    try:
        meta, residual = store.load(q)
    except Exception as e:  # a damaged file of our own: start over rather than stop mining
        log.warning("round %d: residual of round %d unreadable (%s); dropped", rnd, q, e)
        return q, {}
    if meta.get("assignment_hash") != assignment_hash:
        log.warning(
            "round %d: residual of round %d dropped: it is for assignment %s, this round's is %s",
            rnd, q, str(meta.get("assignment_hash"))[:16], assignment_hash[:16],
        )  # fmt: skip
        return q, {}
    problem = fits(residual, delta)
    if problem:
        log.warning("round %d: residual of round %d dropped: %s", rnd, q, problem)
        return q, {}
    return q, residual


def write_with_feedback(directory: str | Path, out: str | Path, delta: Delta, meta) -> str:
    """Write `delta` to `out` as meta.encoding (a DeltaMeta) with error feedback kept in
    `directory`; the sha256 of the delta file. Lossless encodings: a plain write_delta."""
    if parse_encoding(meta.encoding).lossless:
        return write_delta(out, delta, meta)
    store = ResidualStore(directory)
    source, residual = previous_residual(store, meta.round, meta.assignment_hash, delta)
    x = corrected(delta, residual)
    wire = encode_delta(x, meta.encoding)
    sent = decode_delta(wire, meta.encoding, list(x))
    digest = write_encoded(out, wire, meta)
    left = residual_of(x, sent)
    store.save(meta.round, left, assignment_hash=meta.assignment_hash, encoding=meta.encoding)
    # Keep the file this round read: a re-run of this round must find it again.
    store.prune(source if source is not None else meta.round)
    norm = sum(float(t.norm()) ** 2 for t in left.values()) ** 0.5
    log.info(
        "round %d: %s error feedback: %s, residual norm %.4g kept",
        meta.round, meta.encoding,
        f"residual of round {source} added" if residual else "no residual added", norm,
    )  # fmt: skip
    return digest
