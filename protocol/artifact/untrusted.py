"""The validator's only way in: load a delta from a possibly hostile file, or reject it.

The safetensors container is parsed and checked from raw bytes (size, header length, JSON,
duplicate keys, metadata, key names, dtypes, shapes, offsets) before any tensor is allocated;
the metadata's encoding fixes the exact set of tensors, their dtypes and shapes
(protocol.artifact.encodings.wire_entries: a low-rank factor's rank comes from the encoding name and
the projection's shape, never from the file). Only then does safetensors build tensors: scales
must be finite and >= 0 and factors finite, and every projection is decoded to a dense tensor
(its stored dtype for dense encodings, float32 for compressed ones), whose values are checked
for NaN/Inf and magnitude, and a delta whose every decoded value is zero is refused (`zero`:
int8 scales of 0 or zero factors decode to nothing too). With `lazy=True` a compressed delta comes back as a
`protocol.artifact.delta.WireDelta` instead (checked the same way, then kept as its wire tensors).
Every rejection is a `DeltaRejected` with a machine-readable `.code`. Nothing is ever
unpickled.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load

from protocol.artifact.delta import (
    DEFAULT_MAX_ABS,
    METADATA_KEY,
    DeltaMeta,
    DeltaRejected,
    WireDelta,
    _header_limit,
    _strict_int,
    _strict_json_loads,
    decode_projection,
    expert_keys,
    parse_expert_key,
    wire_layout,
)
from protocol.artifact.encodings import (
    ITEMSIZE,
    MAX_ENTRIES_PER_PROJECTION,
    parse_encoding,
    rank_problem,
)
from protocol.moe.model import ExpertLayout

if TYPE_CHECKING:
    from protocol.moe.experts import Assignment


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
    expected_shard: str | None = None,
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
    if expected_shard is not None and meta.shard != expected_shard:
        # A replay names an old round's shard, a copy its author's, a lazy trainer one reused.
        raise DeltaRejected(
            "wrong_shard",
            f"delta declares shard {meta.shard[:16]}..., the committer's shard for this task "
            f"and round is {expected_shard[:16]}... (protocol.round.shards.shard_key)",
        )
    return meta


def _describe_unexpected(key: str, layout: ExpertLayout, expected: dict, encoding: str) -> str:
    cut = key.find(".weight.")
    base = key[: cut + len(".weight")] if cut >= 0 else None
    if base is not None and any(hub == base for _, _, hub in expected.values()):
        parts = ", ".join(n.removeprefix(base) or "<key>" for n in expected if n.startswith(base))
        extra = key[len(base) :]
        return f"{key!r}: encoding {encoding} has no {extra!r} part (it stores {parts})"
    parsed = parse_expert_key(key)
    if parsed and parsed[0] == layout.prefix:
        _, layer, expert, _ = parsed
        return f"{key!r}: expert {expert} of layer {layer} is not in the assignment"
    return f"{key!r} is not an assigned expert weight (only assigned experts' deltas are allowed)"


def _shape_problem(name: str, shape, want: list[int], encoding: str) -> str:
    """Why `shape` is not `want`; a low-rank factor's wrong rank is named as such."""
    if (
        encoding.startswith("lowrank")
        and name.endswith((".u", ".v"))
        and isinstance(shape, list)
        and len(shape) == 2
        and all(_strict_int(d) is not None for d in shape)
    ):
        side = 1 if name.endswith(".u") else 0  # U [m, r], V [r, n]
        if shape[1 - side] == want[1 - side] and shape[side] != want[side]:
            return (
                f"{name}: factor of rank {shape[side]}, encoding {encoding} on this projection "
                f"has rank exactly {want[side]} (min of the encoding's rank and the projection's sides)"
            )
    return f"{name}: shape {shape!r}, expected {want}"


def _check_entry(name: str, entry, want_dtype: str, want: list[int], encoding: str, data_len: int):
    """Validate one tensor entry; return its (begin, end) span in the data section."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise DeltaRejected(
            "header_json", f"{name}: entry must be an object with dtype, shape, data_offsets"
        )
    if entry["dtype"] != want_dtype:
        raise DeltaRejected(
            "dtype", f"{name}: dtype {entry['dtype']!r}, encoding {encoding} stores {want_dtype}"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or any(_strict_int(d) is None for d in shape) or shape != want:
        raise DeltaRejected("shape", _shape_problem(name, shape, want, encoding))
    offs = entry["data_offsets"]
    if not isinstance(offs, list) or len(offs) != 2 or any(_strict_int(o) is None for o in offs):
        raise DeltaRejected("offsets", f"{name}: data_offsets {offs!r} is not a pair of integers")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise DeltaRejected(
            "offsets", f"{name}: data_offsets {offs} outside the {data_len}-byte data section"
        )
    if end - begin != math.prod(want) * ITEMSIZE[want_dtype]:
        raise DeltaRejected(
            "offsets", f"{name}: {end - begin} bytes for shape {want} of {want_dtype}"
        )
    return begin, end


def _check_entries(
    header: dict, meta: DeltaMeta, layout: ExpertLayout, expected: dict, data_len: int
):
    """Exactly the encoding's tensors, each once with its dtype and shape, spans tiling the
    data exactly. `expected` is `wire_layout(layout, assignment, meta.encoding)`."""
    names = sorted(k for k in header if k != "__metadata__")
    for key in names:
        if key not in expected:
            raise DeltaRejected(
                "unexpected_key", _describe_unexpected(key, layout, expected, meta.encoding)
            )
    missing = [k for k in expected if k not in header]
    if missing:
        raise DeltaRejected(
            "missing_key",
            f"{len(missing)} tensors of the assigned experts missing (encoding "
            f"{meta.encoding}), first {missing[0]!r}",
        )
    spans = sorted(
        (*_check_entry(k, header[k], *expected[k][:2], meta.encoding, data_len), k) for k in names
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


def _check_finite(name: str, t: torch.Tensor, what: str = "values") -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise DeltaRejected("nonfinite", f"{name}: {bad} NaN/Inf {what}")


def _check_parts(wire: dict[str, torch.Tensor], names: list[str]) -> None:
    """The stored parts of one projection: float parts finite, scales also >= 0."""
    for name in names:
        t = wire[name]
        if not t.is_floating_point():
            continue  # int8 values: any byte is a value in [-128, 127]
        is_scale = name.endswith(".scale")
        _check_finite(name, t, "scales" if is_scale else "values")
        if is_scale and t.numel() and float(t.amin()) < 0:
            bad = int((t < 0).sum())
            raise DeltaRejected(
                "scale", f"{name}: {bad} negative scales (a scale is rowmax / 127 >= 0)"
            )


def _check_values(key: str, t: torch.Tensor, max_abs: float, encoding: str) -> None:
    """The decoded dense values: finite and at most max_abs in magnitude."""
    what = "values" if encoding in ("float32", "bfloat16", "float16") else "decoded values"
    _check_finite(key, t, what)
    peak = float(t.abs().amax()) if t.numel() else 0.0
    if peak > max_abs:
        raise DeltaRejected(
            "magnitude", f"{key}: |{what[:-1]}| reaches {peak:.4g} > limit {max_abs:g}"
        )


def read_delta_untrusted(
    path: str | Path,
    *,
    layout: ExpertLayout,
    assignment: Assignment,
    max_bytes: int,
    expected_base_hash: str | None = None,
    expected_round: int | None = None,
    expected_shard: str | None = None,
    expected_sha256: str | None = None,
    max_abs: float = DEFAULT_MAX_ABS,
    lazy: bool = False,
) -> tuple[DeltaMeta, dict[str, torch.Tensor] | WireDelta]:
    """Load a delta from a possibly hostile file, or raise DeltaRejected with a `.code`.

    The container is checked from raw bytes (size, header, metadata, keys, dtypes, shapes,
    offsets) before any tensor exists; only then does safetensors build tensors. Scales and
    factors are checked, each projection is decoded, and the decoded values are checked for
    NaN/Inf and magnitude. Whatever the encoding, the tensors come back dense under the hub
    keys (stored dtype for dense encodings, float32 for compressed ones), in canonical order;
    with `lazy`, a compressed delta comes back as a WireDelta over the checked wire tensors,
    which decodes a projection when it is read (a validator then holds the wire bytes, not
    the float32 delta). Never unpickles anything. The expected_* claims are checked when given:
    `expected_shard` is the committer's shard key for the round (protocol.round.shards).
    """
    data = _read_bounded(path, max_bytes)
    if expected_sha256 is not None:
        # First: bytes that do not match the commitment are not worth parsing.
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise DeltaRejected("sha256", f"file sha256 {actual} != expected {expected_sha256}")
    keys = expert_keys(layout, assignment)
    # Before the metadata is read, the limit of the encoding with the most tensors applies;
    # once it is known, that encoding's own.
    n = _header_length(data[:8], len(data), _header_limit(MAX_ENTRIES_PER_PROJECTION * len(keys)))
    header = _parse_header(data[8 : 8 + n])
    meta = _check_metadata(header, assignment, expected_base_hash, expected_round, expected_shard)
    expected = wire_layout(layout, assignment, meta.encoding)
    if n > _header_limit(len(expected)):
        raise DeltaRejected(
            "header_size",
            f"header length {n} over the {_header_limit(len(expected))} bytes a "
            f"{meta.encoding} delta of {len(keys)} projections may use",
        )
    _check_entries(header, meta, layout, expected, len(data) - 8 - n)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        problem = rank_problem(meta.encoding, layout.proj_shape(proj))
        if problem:  # before any factor is allocated or multiplied
            raise DeltaRejected("rank", problem)
    try:
        loaded = load(data)
    except Exception as e:  # our checks passed, so this is a parser disagreement: still reject
        raise DeltaRejected("safetensors", f"safetensors refused the file: {e}") from e
    del data
    enc = parse_encoding(meta.encoding)
    parts: dict[str, list[str]] = {}
    for name, (_, _, key) in expected.items():
        parts.setdefault(key, []).append(name)
    keep_wire = lazy and enc.kind != "dense"
    tensors = {}
    changes = False  # whether any decoded value is nonzero
    for key in keys:
        _check_parts(loaded, parts[key])
        dense = decode_projection(loaded, enc, key)
        if not keep_wire:
            for name in parts[key]:
                del loaded[name]  # the dense value replaces its wire parts as we go
        _check_values(key, dense, max_abs, meta.encoding)
        changes = changes or bool(dense.any())  # one projection at a time: no extra memory
        if not keep_wire:
            tensors[key] = dense
        del dense
    if not changes:
        # A delta that changes nothing is not work: it would score ~0 anyway, but it still
        # costs a validator an evaluation and can sit in the duplicate history.
        raise DeltaRejected("zero", "every decoded value is zero: the delta changes nothing")
    if keep_wire:
        shapes = {key: layout.proj_shape(parse_expert_key(key)[3]) for key in keys}
        return meta, WireDelta(loaded, enc, shapes)
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
