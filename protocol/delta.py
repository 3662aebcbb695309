"""Expert deltas: the artifact a miner ships and a validator checks.

A delta is a safetensors file holding only the assigned experts' differences (trained minus
base) under hub per-expert key names (`ExpertLayout.expert_key`, e.g.
`model.layers.3.mlp.experts.17.gate_proj.weight`, shape `ExpertLayout.proj_shape`). Its
`__metadata__` has exactly one key, "moesaic", whose value is the canonical JSON of a
`DeltaMeta`: safetensors output is byte-stable only with at most one metadata key, and the
sha256 of the exact bytes is what the chain commits to.

Producing:  `snapshot_experts` before training, `extract_delta` after, `write_delta`.
Consuming:  `read_delta_untrusted` (a validator's only way in: the container is parsed and
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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protocol.atomic import write_bytes_atomic
from protocol.hashing import canonical_json
from protocol.model import EXPERT_PROJS, ExpertLayout, expert_slices

if TYPE_CHECKING:
    from torch import nn

    from protocol.experts import Assignment

DELTA_FORMAT = "moesaic-delta"
DELTA_FORMAT_VERSION = 1
METADATA_KEY = "moesaic"
DEFAULT_MAX_ABS = 1e3

# encoding name in DeltaMeta -> (safetensors dtype name, torch dtype, bytes per element)
ENCODINGS: dict[str, tuple[str, torch.dtype, int]] = {
    "float32": ("F32", torch.float32, 4),
    "bfloat16": ("BF16", torch.bfloat16, 2),
    "float16": ("F16", torch.float16, 2),
}

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
    encoding: str = "float32"  # element type of every tensor: a key of ENCODINGS
    format: str = DELTA_FORMAT
    format_version: int = DELTA_FORMAT_VERSION

    def __post_init__(self):
        if self.format != DELTA_FORMAT:
            raise ValueError(f"format {self.format!r} is not {DELTA_FORMAT!r}")
        if _strict_int(self.format_version) != DELTA_FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version!r} unsupported (want {DELTA_FORMAT_VERSION})"
            )
        for name in ("base_hash", "assignment_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.match(value):
                raise ValueError(f"{name} {value!r} is not a lowercase hex sha256")
        for name in ("round", "tokens"):
            value = _strict_int(getattr(self, name))
            if value is None or value < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} is not a non-negative integer")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r} unknown; one of {sorted(ENCODINGS)}")

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


def max_delta_bytes(layout: ExpertLayout, assignment: Assignment, encoding: str = "float32") -> int:
    """Upper bound on the file size of a well-formed delta for this assignment."""
    num_keys = len(expert_keys(layout, assignment))
    itemsize = ENCODINGS[encoding][2]
    return (
        8
        + _header_limit(num_keys)
        + assignment.num_selected() * layout.params_per_expert() * itemsize
    )


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
    """Write `tensors` cast to meta.encoding atomically; return the sha256 of the bytes written.

    The same content always produces the same bytes (single metadata key, sorted keys), so the
    returned digest can be committed on chain and recomputed by anyone holding the file.
    """
    if not tensors:
        raise ValueError("refusing to write an empty delta")
    dtype = ENCODINGS[meta.encoding][1]
    prepared = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{key}: delta values must be floating-point tensors")
        # copy=True: views into a fused parameter would otherwise share storage, which
        # safetensors refuses to serialise.
        cast = t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
        if not bool(torch.isfinite(cast).all()):
            raise ValueError(f"{key}: non-finite values after casting to {meta.encoding}")
        prepared[key] = cast
    from safetensors.torch import save

    data = save(prepared, metadata={METADATA_KEY: meta.to_json()})
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


# --- consuming untrusted files ----------------------------------------------------------------


def _read_bounded(path: str | Path, max_bytes: int) -> bytes:
    """The whole file, refusing anything larger than max_bytes before reading it."""
    st = os.stat(path)  # FileNotFoundError propagates: a missing file is not a hostile one
    if not stat.S_ISREG(st.st_mode):
        raise DeltaRejected("not_file", f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise DeltaRejected("too_large", f"file is {st.st_size} bytes, limit {max_bytes}")
    with open(path, "rb") as f:
        # Read what stat saw plus one byte (never max_bytes: the buffer is reserved up front),
        # so a file that grew after the stat is noticed without a huge allocation.
        data = f.read(st.st_size + 1)
    if len(data) > min(max_bytes, st.st_size):
        raise DeltaRejected("too_large", f"file grew past the {max_bytes}-byte limit while read")
    return data


def _header_length(first8: bytes, file_size: int, limit: int) -> int:
    if file_size < 8:
        raise DeltaRejected("truncated", f"file is {file_size} bytes; a safetensors file has >= 8")
    n = int.from_bytes(first8, "little")
    if n < 2 or n > limit:
        raise DeltaRejected("header_size", f"header length {n} outside [2, {limit}]")
    if n > file_size - 8:
        raise DeltaRejected(
            "header_size", f"header length {n} runs past the end of a {file_size}-byte file"
        )
    return n


def _parse_header(raw: bytes) -> dict:
    """The header as a dict: strict UTF-8, JSON object, no duplicate keys, no NaN constants."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DeltaRejected(
            "header_json", f"header is not UTF-8 ({e.reason} at byte {e.start})"
        ) from e
    try:
        header = _strict_json_loads(text)
    except DeltaRejected:
        raise
    except (ValueError, RecursionError) as e:
        raise DeltaRejected("header_json", f"header is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(header, dict):
        raise DeltaRejected(
            "header_json", f"header is a JSON {type(header).__name__}, not an object"
        )
    return header


def _check_metadata(
    header: dict,
    assignment: Assignment,
    expected_base_hash: str | None,
    expected_round: int | None,
) -> DeltaMeta:
    if "__metadata__" not in header:
        raise DeltaRejected("metadata", "header has no __metadata__")
    md = header["__metadata__"]
    if (
        not isinstance(md, dict)
        or list(md) != [METADATA_KEY]
        or not isinstance(md[METADATA_KEY], str)
    ):
        shown = list(md) if isinstance(md, dict) else type(md).__name__
        raise DeltaRejected(
            "metadata",
            f"__metadata__ must hold exactly one string entry {METADATA_KEY!r}, found {shown}",
        )
    try:
        meta = DeltaMeta.from_json(md[METADATA_KEY])
    except DeltaRejected as e:
        raise DeltaRejected("metadata", f"metadata JSON: {e.message}") from e
    except (ValueError, TypeError, RecursionError) as e:
        raise DeltaRejected("metadata", f"metadata invalid: {str(e)[:200]}") from e
    if meta.assignment_hash != assignment.hash():
        raise DeltaRejected(
            "assignment_hash",
            f"delta is for assignment {meta.assignment_hash}, expected {assignment.hash()}",
        )
    if expected_base_hash is not None and meta.base_hash != expected_base_hash:
        raise DeltaRejected(
            "base_hash", f"delta is on base {meta.base_hash}, expected {expected_base_hash}"
        )
    if expected_round is not None and meta.round != expected_round:
        raise DeltaRejected("round", f"delta is for round {meta.round}, expected {expected_round}")
    return meta


def _describe_unexpected(key: str, layout: ExpertLayout) -> str:
    parsed = parse_expert_key(key)
    if parsed and parsed[0] == layout.prefix:
        _, layer, expert, _ = parsed
        return f"{key!r}: expert {expert} of layer {layer} is not in the assignment"
    return f"{key!r} is not an assigned expert weight (only assigned experts' deltas are allowed)"


def _check_entry(
    key: str, entry, layout: ExpertLayout, st_dtype: str, itemsize: int, data_len: int
):
    """Validate one tensor entry; return its (begin, end) span in the data section."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise DeltaRejected(
            "header_json", f"{key}: entry must be an object with dtype, shape, data_offsets"
        )
    if entry["dtype"] != st_dtype:
        raise DeltaRejected(
            "dtype", f"{key}: dtype {entry['dtype']!r}, metadata encoding says {st_dtype}"
        )
    want = list(layout.proj_shape(parse_expert_key(key)[3]))
    shape = entry["shape"]
    if not isinstance(shape, list) or any(_strict_int(d) is None for d in shape) or shape != want:
        raise DeltaRejected("shape", f"{key}: shape {shape!r}, expected {want}")
    offs = entry["data_offsets"]
    if not isinstance(offs, list) or len(offs) != 2 or any(_strict_int(o) is None for o in offs):
        raise DeltaRejected("offsets", f"{key}: data_offsets {offs!r} is not a pair of integers")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise DeltaRejected(
            "offsets", f"{key}: data_offsets {offs} outside the {data_len}-byte data section"
        )
    if end - begin != math.prod(want) * itemsize:
        raise DeltaRejected("offsets", f"{key}: {end - begin} bytes for shape {want} of {st_dtype}")
    return begin, end


def _check_entries(
    header: dict, meta: DeltaMeta, layout: ExpertLayout, assignment: Assignment, data_len: int
):
    """Every key assigned and present once, right dtype/shape, spans tiling the data exactly."""
    expected = expert_keys(layout, assignment)
    names = sorted(k for k in header if k != "__metadata__")
    allowed = set(expected)
    for key in names:
        if key not in allowed:
            raise DeltaRejected("unexpected_key", _describe_unexpected(key, layout))
    missing = [k for k in expected if k not in header]
    if missing:
        raise DeltaRejected(
            "missing_key", f"{len(missing)} assigned tensors missing, first {missing[0]!r}"
        )
    st_dtype, _, itemsize = ENCODINGS[meta.encoding]
    spans = sorted(
        (*_check_entry(k, header[k], layout, st_dtype, itemsize, data_len), k) for k in names
    )
    cursor = 0
    for begin, end, key in spans:
        if begin < cursor:
            raise DeltaRejected(
                "offsets", f"{key}: data [{begin}, {end}) overlaps the previous tensor"
            )
        if begin > cursor:
            raise DeltaRejected("offsets", f"{key}: {begin - cursor} unused bytes before it")
        cursor = end
    if cursor != data_len:
        raise DeltaRejected("offsets", f"{data_len - cursor} trailing bytes after the last tensor")


def _check_values(tensors: dict[str, torch.Tensor], max_abs: float) -> None:
    for key in sorted(tensors):
        t = tensors[key]
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise DeltaRejected("nonfinite", f"{key}: {bad} NaN/Inf values")
        peak = float(t.abs().amax()) if t.numel() else 0.0
        if peak > max_abs:
            raise DeltaRejected(
                "magnitude", f"{key}: |value| reaches {peak:.4g} > limit {max_abs:g}"
            )


def read_delta_untrusted(
    path: str | Path,
    *,
    layout: ExpertLayout,
    assignment: Assignment,
    max_bytes: int,
    expected_base_hash: str | None = None,
    expected_round: int | None = None,
    expected_sha256: str | None = None,
    max_abs: float = DEFAULT_MAX_ABS,
) -> tuple[DeltaMeta, dict[str, torch.Tensor]]:
    """Load a delta from a possibly hostile file, or raise DeltaRejected with a `.code`.

    The container is checked from raw bytes (size, header, metadata, keys, dtypes, shapes,
    offsets) before any tensor exists; only then does safetensors build tensors, which are
    checked for NaN/Inf and magnitude. Tensors come back in the file's encoding, keyed in
    canonical order. Never unpickles anything.
    """
    data = _read_bounded(path, max_bytes)
    if expected_sha256 is not None:
        # First: bytes that do not match the commitment are not worth parsing.
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise DeltaRejected("sha256", f"file sha256 {actual} != expected {expected_sha256}")
    keys = expert_keys(layout, assignment)
    n = _header_length(data[:8], len(data), _header_limit(len(keys)))
    header = _parse_header(data[8 : 8 + n])
    meta = _check_metadata(header, assignment, expected_base_hash, expected_round)
    _check_entries(header, meta, layout, assignment, len(data) - 8 - n)
    from safetensors.torch import load

    try:
        loaded = load(data)
    except Exception as e:  # our checks passed, so this is a parser disagreement: still reject
        raise DeltaRejected("safetensors", f"safetensors refused the file: {e}") from e
    del data
    tensors = {k: loaded[k] for k in keys}
    _check_values(tensors, max_abs)
    return meta, tensors


def read_header_untrusted(
    path: str | Path, *, max_header_bytes: int = 64 << 20
) -> tuple[dict, int]:
    """(header dict, data-section length) read from the file's first bytes only.

    For inspection: container framing and JSON are checked, nothing else is trusted.
    """
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        first8 = f.read(8)
        n = _header_length(first8, size, max_header_bytes)
        header = _parse_header(f.read(n))
    return header, size - 8 - n


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
    layout: ExpertLayout, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[int, int, str]]:
    """Map each key to (layer, expert, proj), refusing keys or shapes this model lacks."""
    out = {}
    for key, t in tensors.items():
        parsed = parse_expert_key(key)
        if parsed is None or layout.expert_key(*parsed[1:]) != key:
            raise ValueError(
                f"{key!r} is not an expert key of this model (prefix {layout.prefix!r})"
            )
        _, layer, e, proj = parsed
        if layer not in layout.moe_layers or not 0 <= e < layout.num_experts:
            raise ValueError(f"{key!r}: layer {layer} / expert {e} does not exist in this model")
        if tuple(t.shape) != layout.proj_shape(proj):
            raise ValueError(f"{key!r}: shape {tuple(t.shape)}, expected {layout.proj_shape(proj)}")
        out[key] = (layer, e, proj)
    return out


@torch.no_grad()
def apply_delta(
    model: nn.Module,
    layout: ExpertLayout,
    tensors: dict[str, torch.Tensor],
    *,
    scale: float = 1.0,
) -> AppliedDelta:
    """Add scale * delta into the fused expert tensors in place; return a handle to revert.

    All keys are checked before anything is modified. The sum is formed in float32 and rounded
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
