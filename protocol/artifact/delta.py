"""Expert deltas: the artifact a miner ships and a validator checks.

A delta is a safetensors file holding only the assigned experts' differences (trained minus
base) under hub per-expert key names (`ExpertLayout.expert_key`, e.g.
`model.layers.3.mlp.experts.17.gate_proj.weight`, shape `ExpertLayout.proj_shape`). Its
`__metadata__` has exactly one key, "moesaic", whose value is the canonical JSON of a
`DeltaMeta`: safetensors output is byte-stable only with at most one metadata key, and the
sha256 of the exact bytes is what the chain commits to.

Producing:  `snapshot_experts` before training, `extract_delta` after, `write_delta`.
Consuming:  `protocol.artifact.untrusted.read_delta_untrusted` (a validator's only way in: the container is parsed and
            checked from raw bytes before any tensor is allocated), then `apply_delta`, whose
            `AppliedDelta.revert()` restores the model bit-exactly.

Typical use::

    base = snapshot_experts(model, layout, assignment)
    ...  # train
    sha = write_delta(path, extract_delta(model, layout, assignment, base), meta)
    meta, tensors = read_delta_untrusted(path, layout=layout, assignment=assignment,
                                         max_bytes=max_delta_bytes(layout, assignment))
    with apply_delta(model, layout, tensors):
        ...  # evaluate

Encodings (`DeltaMeta.encoding`): the file holds each projection in the wire layout of its
encoding; encoding, decoding and the lazy `WireDelta` are in protocol.artifact.wire (re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

from protocol.artifact.encodings import (
    MAX_ENTRIES_PER_PROJECTION,
    Encoding,
    parse_encoding,
    payload_bytes,
    widest_payload_bytes,
    wire_entries,
)
from protocol.artifact.wire import (  # noqa: F401 (re-exported: the delta's readers import them here)
    ENCODINGS,
    WireDelta,
    decode_delta,
    decode_projection,
    delta_shapes,
    encode_delta,
    held_bytes,
    wire_roundtrip,
)
from protocol.identity.hashing import canonical_json
from protocol.moe.model import EXPERT_PROJS, ExpertLayout, expert_slices
from protocol.ops.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from torch import nn

    from protocol.moe.experts import Assignment

DELTA_FORMAT = "moesaic-delta"
# 2: `shard` (the training shard the delta declares, protocol.round.shards) became required.
DELTA_FORMAT_VERSION = 2
METADATA_KEY = "moesaic"
DEFAULT_MAX_ABS = 1e3

# Header budget: a few KiB for metadata plus a generous 256 bytes per tensor entry (a real entry
# is ~150), so a hostile header cannot make the JSON parser chew on megabytes.
_HEADER_BASE_BYTES = 4096
_HEADER_BYTES_PER_KEY = 256
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_EXPERT_KEY_RE = re.compile(
    r"^(?P<prefix>.+)\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_META_FIELDS = (
    "format",
    "format_version",
    "base_hash",
    "assignment_hash",
    "round",
    "tokens",
    "shard",
    "encoding",
)


class DeltaRejected(ValueError):
    """A delta file failed validation. `.code` is machine-readable, the message names the value."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DeltaMeta:
    """What a delta claims about itself; stored as the single "moesaic" metadata entry."""

    base_hash: str  # sha256_dir of the base checkpoint the delta was trained from
    assignment_hash: str  # Assignment.hash() of the experts it covers
    round: int  # protocol round it was produced for
    tokens: int  # training tokens the miner reports (unverified claim)
    # The shard key it was trained on (protocol.round.shards.shard_key of task, hotkey, round;
    # UNSHARDED for a one-off job): validators refuse any other as `wrong_shard`.
    shard: str
    encoding: str = (
        "float32"  # wire encoding: protocol.artifact.encodings.parse_encoding accepts it
    )
    format: str = DELTA_FORMAT
    format_version: int = DELTA_FORMAT_VERSION

    def __post_init__(self):
        if self.format != DELTA_FORMAT:
            raise ValueError(f"format {self.format!r} is not {DELTA_FORMAT!r}")
        if _strict_int(self.format_version) != DELTA_FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version!r} unsupported (want {DELTA_FORMAT_VERSION})"
            )
        for name in ("base_hash", "assignment_hash", "shard"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.match(value):
                raise ValueError(f"{name} {value!r} is not a lowercase hex sha256")
        for name in ("round", "tokens"):
            value = _strict_int(getattr(self, name))
            if value is None or value < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} is not a non-negative integer")
        parse_encoding(self.encoding)  # ValueError naming the valid encodings

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal metas give equal bytes."""
        return canonical_json(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> DeltaMeta:
        """Parse and validate; unknown or missing fields are errors (ValueError)."""
        data = _strict_json_loads(text)
        if not isinstance(data, dict):
            raise ValueError("delta metadata is not a JSON object")
        if set(data) != set(_META_FIELDS):
            extra, missing = (
                sorted(set(data) - set(_META_FIELDS)),
                sorted(set(_META_FIELDS) - set(data)),
            )
            raise ValueError(f"delta metadata fields wrong: unknown {extra}, missing {missing}")
        return cls(**data)


def _strict_int(value) -> int | None:
    """`value` if it is a real int (bool is not), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DeltaRejected("duplicate_key", f"header names {key!r} twice")
        seen[key] = value
    return seen


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _strict_json_loads(text: str | bytes):
    """json.loads that refuses duplicate keys (DeltaRejected) and NaN/Infinity (ValueError)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


# --- keys and sizes ---------------------------------------------------------------------------


def expert_keys(layout: ExpertLayout, assignment: Assignment) -> list[str]:
    """Hub keys of every assigned expert projection, in canonical (layer, expert, proj) order."""
    check_fits(layout, assignment)
    return [
        layout.expert_key(layer, e, proj)
        for layer, e in assignment.pairs()
        for proj in EXPERT_PROJS
    ]


def check_fits(layout: ExpertLayout, assignment: Assignment) -> None:
    """Raise ValueError if the assignment names layers or experts the model does not have."""
    if assignment.num_experts != layout.num_experts:
        raise ValueError(
            f"assignment is for {assignment.num_experts} experts per layer, model has {layout.num_experts}"
        )
    missing = sorted(set(assignment.layers) - set(layout.moe_layers))
    if missing:
        raise ValueError(
            f"assignment names layers {missing} that have no routed experts in this model"
        )


def parse_expert_key(key: str) -> tuple[str, int, int, str] | None:
    """(prefix, layer, expert, proj) of a hub per-expert key, or None if it is not one."""
    m = _EXPERT_KEY_RE.match(key)
    if not m:
        return None
    return m["prefix"], int(m["layer"]), int(m["expert"]), m["proj"]


def _header_limit(num_keys: int) -> int:
    return _HEADER_BASE_BYTES + _HEADER_BYTES_PER_KEY * num_keys


def wire_layout(
    layout: ExpertLayout, assignment: Assignment, encoding: str | Encoding
) -> dict[str, tuple[str, list[int], str]]:
    """Every tensor a delta of `encoding` holds: name -> (safetensors dtype, shape, hub key),
    in canonical key order (protocol.artifact.encodings.wire_entries per projection)."""
    out = {}
    for key in expert_keys(layout, assignment):
        shape = layout.proj_shape(parse_expert_key(key)[3])
        for name, dtype, dims in wire_entries(encoding, key, shape):
            out[name] = (dtype, dims, key)
    return out


def max_delta_bytes(
    layout: ExpertLayout, assignment: Assignment, encoding: str | None = None
) -> int:
    """Upper bound on the file size of a well-formed delta for this assignment: for one
    encoding (its exact data size plus the header limit), or by default for any encoding
    (what a validator or merger that accepts every encoding must allow)."""
    keys = expert_keys(layout, assignment)
    shapes = [layout.proj_shape(parse_expert_key(k)[3]) for k in keys]
    if encoding is None:
        entries = MAX_ENTRIES_PER_PROJECTION * len(keys)
        data = sum(widest_payload_bytes(shape) for shape in shapes)
    else:
        enc = parse_encoding(encoding)
        entries = sum(len(wire_entries(enc, "k", shape)) for shape in shapes)
        data = sum(payload_bytes(enc, shape) for shape in shapes)
    return 8 + _header_limit(entries) + data


# --- producing --------------------------------------------------------------------------------


def snapshot_experts(
    model: nn.Module, layout: ExpertLayout, assignment: Assignment
) -> dict[str, torch.Tensor]:
    """Copies of the assigned experts' current weights under hub keys (the base for a delta)."""
    check_fits(layout, assignment)
    out = {}
    for layer, e in assignment.pairs():
        for proj, view in expert_slices(model, layout, layer, e).items():
            out[layout.expert_key(layer, e, proj)] = view.detach().clone()
    return out


def extract_delta(
    model: nn.Module,
    layout: ExpertLayout,
    assignment: Assignment,
    base_state: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """current - base for every assigned expert projection, as float32 CPU tensors.

    The subtraction is done in float32 so a bf16 model does not lose the small differences
    to a second rounding; `write_delta` rounds once to the chosen encoding.
    """
    current = snapshot_experts(model, layout, assignment)
    missing = [k for k in current if k not in base_state]
    if missing:
        raise ValueError(f"base_state lacks {len(missing)} assigned keys, e.g. {missing[0]}")
    out = {}
    for key, now in current.items():
        base = base_state[key]
        if tuple(base.shape) != tuple(now.shape):
            raise ValueError(
                f"{key}: base shape {tuple(base.shape)} != model shape {tuple(now.shape)}"
            )
        out[key] = now.float().cpu() - base.float().cpu()
    return out


def write_delta(path: str | Path, tensors: dict[str, torch.Tensor], meta: DeltaMeta) -> str:
    """Encode dense `tensors` as meta.encoding and write them atomically; return the sha256 of
    the bytes written.

    The same content always produces the same bytes (single metadata key, sorted keys; the
    low-rank encodings' SVD is exact or seeded, so deterministic on one machine and library
    build), so the returned digest can be committed on chain and recomputed by anyone holding
    the file.
    """
    return write_encoded(path, encode_delta(tensors, meta.encoding), meta)


def write_encoded(path: str | Path, wire: dict[str, torch.Tensor], meta: DeltaMeta) -> str:
    """Write tensors `encode_delta(..., meta.encoding)` made (atomically); their sha256."""
    if not wire:
        raise ValueError("refusing to write an empty delta")
    data = save(wire, metadata={METADATA_KEY: meta.to_json()})
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


# --- applying ---------------------------------------------------------------------------------


class AppliedDelta:
    """Handle to a delta added into a model; `revert()` puts the saved original slices back.

    Restoring copies rather than subtracting, so the model is bit-identical afterwards whatever
    the dtype. Usable as a context manager (reverts on exit).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ExpertLayout,
        originals: dict[tuple[int, int, str], torch.Tensor],
    ):
        self.model = model
        self.layout = layout
        self._originals = originals

    @property
    def experts(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs the delta touched, sorted."""
        return sorted({(layer, e) for layer, e, _ in self._originals})

    @property
    def active(self) -> bool:
        return bool(self._originals)

    @torch.no_grad()
    def revert(self) -> None:
        """Restore the touched slices; a second call does nothing."""
        for (layer, e, proj), original in self._originals.items():
            # Re-resolve the view: the parameter may have been replaced since apply.
            expert_slices(self.model, self.layout, layer, e)[proj].copy_(original)
        self._originals = {}

    def __enter__(self) -> AppliedDelta:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def _resolve_delta_keys(
    layout: ExpertLayout, tensors: Mapping[str, torch.Tensor]
) -> dict[str, tuple[int, int, str]]:
    """Map each key to (layer, expert, proj), refusing keys or shapes this model lacks."""
    out = {}
    for key, shape in delta_shapes(tensors).items():
        parsed = parse_expert_key(key)
        if parsed is None or layout.expert_key(*parsed[1:]) != key:
            raise ValueError(
                f"{key!r} is not an expert key of this model (prefix {layout.prefix!r})"
            )
        _, layer, e, proj = parsed
        if layer not in layout.moe_layers or not 0 <= e < layout.num_experts:
            raise ValueError(f"{key!r}: layer {layer} / expert {e} does not exist in this model")
        if shape != layout.proj_shape(proj):
            raise ValueError(f"{key!r}: shape {shape}, expected {layout.proj_shape(proj)}")
        out[key] = (layer, e, proj)
    return out


@torch.no_grad()
def apply_delta(
    model: nn.Module,
    layout: ExpertLayout,
    tensors: Mapping[str, torch.Tensor],
    *,
    scale: float = 1.0,
) -> AppliedDelta:
    """Add scale * delta into the fused expert tensors in place; return a handle to revert.

    All keys are checked before anything is modified; each value is read once (a WireDelta
    decodes one projection at a time). The sum is formed in float32 and rounded
    once to the model's dtype.
    """
    where = _resolve_delta_keys(layout, tensors)
    originals: dict[tuple[int, int, str], torch.Tensor] = {}
    for key, (layer, e, proj) in where.items():
        view = expert_slices(model, layout, layer, e)[proj]
        originals[(layer, e, proj)] = view.clone()
        delta = tensors[key].to(device=view.device, dtype=torch.float32)
        view.copy_(view.float() + scale * delta)
    return AppliedDelta(model, layout, originals)


# --- summaries --------------------------------------------------------------------------------


def delta_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each tensor (float32), keyed like the input, in sorted key order."""
    return {k: float(tensors[k].float().norm()) for k in sorted(tensors)}


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All values as one 1-D float32 CPU tensor in sorted-key order (for cosine similarity)."""
    if not tensors:
        raise ValueError("cannot flatten an empty delta")
    return torch.cat([tensors[k].detach().float().cpu().reshape(-1) for k in sorted(tensors)])
