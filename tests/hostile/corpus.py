"""A corpus of malformed and hostile delta artifacts, each derived from one real valid delta.

Every class in `CLASSES` names one defect, the threat it stands for, the rejection code
`protocol.artifact.untrusted.read_delta_untrusted` (and so `moesaic artifact verify`) must answer
with, and a builder that turns the valid file's bytes into the hostile bytes. A builder changes
exactly one thing and keeps everything else well formed (offsets re-tiled, header length
re-counted), so the expected code is the check that guards against that defect and not an
earlier, accidental one.

The compressed encodings' classes (int8, lowrank<R>, lowrank<R>-int8) start from that same
valid delta re-encoded by the project's own writer (`encoded`: same tensors, same claims but
the encoding) and change one thing in it; `SOURCE_ENCODINGS` lists those re-encodings, which
tests/hostile/test_encoded_artifacts.py shows are accepted before any defect is added.

Some classes never reach the reader on the validator's path: `fetch_code` is then the outcome
code `protocol.round.submissions.fetch_submission` refuses them with (the manifest cannot declare
them, or the store does not hand the bytes out).

No torch at import: scripts/security_counts.py imports this module only to count the classes.
`make_valid` (which writes the real delta with the project's own code) imports torch lazily.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

# Where the malicious pickle would create a directory if anything ever unpickled it.
PICKLE_SENTINEL = Path(tempfile.gettempdir()) / "moesaic-hostile-pickle-was-loaded"
_KEY_RE = re.compile(r"^(?P<head>.+\.)(?P<layer>\d+)(?P<mid>\.mlp\.experts\.)(?P<expert>\d+)\.")


@dataclass(frozen=True)
class Valid:
    """A real, valid delta file and the facts about it the builders need."""

    data: bytes  # the file's exact bytes, as write_delta produced them
    keys: tuple[str, ...]  # the assigned tensor keys, in canonical order
    cap: int  # max_delta_bytes(layout, assignment): the validator's default size limit
    header_limit: int  # the longest header the reader accepts for this assignment
    round: int  # the round written into the metadata
    hidden: int  # model width: shapes the extra non-expert tensors
    num_experts: int  # experts per layer in the model

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def assigned(self) -> set[tuple[int, int]]:
        """(layer, expert) pairs present in the valid file."""
        out = set()
        for key in self.keys:
            m = _KEY_RE.match(key)
            out.add((int(m["layer"]), int(m["expert"])))
        return out


@dataclass(frozen=True)
class ArtifactClass:
    """One named kind of hostile artifact and how it must be refused."""

    name: str
    code: str  # DeltaRejected.code from read_delta_untrusted / `moesaic artifact verify`
    threat: str  # what an attacker (or a broken miner) gains if it were accepted
    build: Callable[[Valid], bytes]
    fetch_code: str | None = None  # Rejected.code when fetch_submission refuses it first
    claims_valid_sha: bool = False  # the commitment names the valid file's sha256, not its own


def make_valid(
    model_dir: str | Path, assignment: Any, out: str | Path, *, round: int = 3, shard: str = ""
) -> Valid:
    """Write a real delta for `assignment` over the model in `model_dir`, declaring `shard`
    (default: protocol.round.shards.UNSHARDED); describe it."""
    import torch

    from protocol.artifact.delta import (
        DeltaMeta,
        _header_limit,
        expert_keys,
        max_delta_bytes,
        parse_expert_key,
        write_delta,
    )
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.model import expert_layout, load_model
    from protocol.round.shards import UNSHARDED

    layout = expert_layout(load_model(model_dir))
    keys = expert_keys(layout, assignment)
    g = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.randn(layout.proj_shape(parse_expert_key(k)[3]), generator=g) * 0.01 for k in keys
    }
    meta = DeltaMeta(
        base_hash=sha256_dir(model_dir),
        assignment_hash=assignment.hash(),
        round=round,
        tokens=1000,
        shard=shard or UNSHARDED,
    )
    write_delta(out, tensors, meta)
    gate = layout.proj_shape("gate_proj")  # [I, H]
    return Valid(
        data=Path(out).read_bytes(),
        keys=tuple(keys),
        cap=max_delta_bytes(layout, assignment),
        header_limit=_header_limit(len(keys)),
        round=round,
        hidden=gate[1],
        num_experts=layout.num_experts,
    )


# ---------------------------------------------------------------------------- byte surgery


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict in file order, data section) of a well-formed file."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def pack(header: dict | str | bytes, body: bytes = b"", *, header_len: int | None = None) -> bytes:
    """Length prefix + header + data; the prefix counts the header unless header_len is given."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode() if isinstance(header, str) else header
    n = len(raw) if header_len is None else header_len
    return n.to_bytes(8, "little") + raw + body


def raw_object(pairs: list[tuple[str, str]]) -> str:
    """A JSON object from (key, value-as-JSON-text) pairs: the only way to repeat a key."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


def items(v: Valid) -> list[list]:
    """[key, dtype, shape, bytes] per tensor, in data-section order."""
    header, body = split(v.data)
    rows = [(e["data_offsets"], k, e) for k, e in header.items() if k != "__metadata__"]
    return [[k, e["dtype"], e["shape"], body[b:end]] for (b, end), k, e in sorted(rows)]


_ABSENT = object()


def assemble(rows: list[list], metadata: Any = _ABSENT) -> bytes:
    """A file from [key, dtype, shape, bytes] rows, offsets tiling the data in row order."""
    header: dict = {} if metadata is _ABSENT else {"__metadata__": metadata}
    body, cursor = bytearray(), 0
    for key, dtype, shape, raw in rows:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + len(raw)]}
        body += raw
        cursor += len(raw)
    return pack(header, bytes(body))


def metadata(v: Valid) -> dict:
    return split(v.data)[0]["__metadata__"]


def meta_fields(v: Valid) -> dict:
    """The DeltaMeta fields of the valid file."""
    return json.loads(metadata(v)["moesaic"])


def with_fields(v: Valid, fields: dict) -> bytes:
    """The valid tensors under a metadata entry holding exactly `fields`."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return assemble(items(v), {"moesaic": text})


def with_meta(v: Valid, **changes) -> bytes:
    return with_fields(v, {**meta_fields(v), **changes})


def with_metadata(v: Valid, md: Any = _ABSENT) -> bytes:
    return assemble(items(v), md)


def edit_header(v: Valid, fn: Callable[[dict], None]) -> bytes:
    """Apply fn to the parsed header in place; the data section is kept byte for byte."""
    header, body = split(v.data)
    fn(header)
    return pack(header, body)


def edit_rows(v: Valid, fn: Callable[[list[list]], None]) -> bytes:
    rows = items(v)
    fn(rows)
    return assemble(rows, metadata(v))


def set_first_value(v: Valid, value: float) -> bytes:
    """Overwrite the first float32 element of the first tensor."""
    import struct

    header, body = split(v.data)
    begin = header[v.keys[0]]["data_offsets"][0]
    return pack(header, body[:begin] + struct.pack("<f", value) + body[begin + 4 :])


def zero_values(v: Valid) -> bytes:
    """Every byte of the data section zeroed: every float value +0.0, the container intact."""
    header, body = split(v.data)
    return pack(header, bytes(len(body)))


def zero_parts(suffix: str):
    """Builder: every projection's `suffix` part (e.g. the int8 scales) set to 0."""

    def build(v):
        def edit(wire):
            for name, t in wire.items():
                if name.endswith(suffix):
                    t.zero_()

        return edit_wire(v, edit)

    return build


def rename_key(key: str, *, layer: int | None = None, expert: str | None = None) -> str:
    m = _KEY_RE.match(key)
    lay = m["layer"] if layer is None else str(layer)
    exp = m["expert"] if expert is None else expert
    return f"{m['head']}{lay}{m['mid']}{exp}.{key[m.end() :]}"


def rename_first_expert(v: Valid, **kw) -> bytes:
    """Every projection of the first (layer, expert) renamed as `rename_key(..., **kw)`."""
    first = _KEY_RE.match(v.keys[0]).group(0)

    def fn(rows):
        for row in rows:
            if row[0].startswith(first):
                row[0] = rename_key(row[0], **kw)

    return edit_rows(v, fn)


def unassigned_expert(v: Valid) -> tuple[int, int]:
    """(layer, expert) of an expert of the first assigned layer that is not assigned."""
    layer = min(layer for layer, _ in v.assigned())
    taken = {e for lay, e in v.assigned() if lay == layer}
    return layer, min(e for e in range(v.num_experts) if e not in taken)


def add_tensor(v: Valid, key: str, shape: list[int]) -> bytes:
    """The valid file plus one zero float32 tensor `key` (sized right, offsets re-tiled)."""
    count = 1
    for d in shape:
        count *= d
    return edit_rows(v, lambda rows: rows.append([key, "F32", shape, bytes(4 * count)]))


def drop_last_expert(v: Valid) -> bytes:
    """Every projection of the last assigned (layer, expert) left out."""
    last = _KEY_RE.match(v.keys[-1]).group(0)
    return assemble([r for r in items(v) if not r[0].startswith(last)], metadata(v))


def entry_edit(v: Valid, key_index: int, **changes) -> bytes:
    def fn(header):
        header[v.keys[key_index]].update(changes)

    return edit_header(v, fn)


def duplicate_pair(v: Valid, which: str) -> bytes:
    """Header text with one key repeated: the tensor entry, __metadata__, or an entry field."""
    header, body = split(v.data)
    pairs = [(k, json.dumps(e, separators=(",", ":"))) for k, e in header.items()]
    if which == "tensor":
        first = next(i for i, (k, _) in enumerate(pairs) if k != "__metadata__")
        pairs.insert(first + 1, pairs[first])
    elif which == "metadata":
        pairs.append(pairs[0])
    else:  # a field inside one tensor entry
        entry = header[v.keys[0]]
        fields = [("dtype", json.dumps(entry["dtype"]))] + [
            (f, json.dumps(entry[f], separators=(",", ":"))) for f in entry
        ]
        pairs = [(k, raw_object(fields) if k == v.keys[0] else e) for k, e in pairs]
    return pack(raw_object(pairs), body)


def insert_gap(v: Valid, gap: int = 16) -> bytes:
    """Unused bytes between the first and second tensors, later offsets shifted past them."""
    header, body = split(v.data)
    spans = sorted((e["data_offsets"], k) for k, e in header.items() if k != "__metadata__")
    end = spans[0][0][1]
    for (b, e), k in spans[1:]:
        header[k]["data_offsets"] = [b + gap, e + gap]
    return pack(header, body[:end] + bytes(gap) + body[end:])


def overlap(v: Valid) -> bytes:
    """The second tensor (in data order) points at the first one's bytes."""
    header, body = split(v.data)
    spans = sorted((e["data_offsets"], k) for k, e in header.items() if k != "__metadata__")
    header[spans[1][1]]["data_offsets"] = list(spans[0][0])
    return pack(header, body)


def shift_last(v: Valid, to: Callable[[int, int, int], list]) -> bytes:
    """The last tensor's offsets replaced by to(begin, end, data_len)."""
    header, body = split(v.data)
    (b, e), k = max((e["data_offsets"], k) for k, e in header.items() if k != "__metadata__")
    header[k]["data_offsets"] = to(b, e, len(body))
    return pack(header, body)


def header_bytes(v: Valid) -> tuple[bytes, bytes]:
    n = int.from_bytes(v.data[:8], "little")
    return v.data[8 : 8 + n], v.data[8 + n :]


def oversized_header(v: Valid) -> bytes:
    """A valid header padded with spaces one byte past the limit, data cut to stay under the
    cap (the cap allows a full-size header, so a longer one needs a shorter data section)."""
    raw, _ = header_bytes(v)
    return pack(raw.ljust(v.header_limit + 1, b" "), b"\0" * 64)


def deep_nesting(v: Valid) -> bytes:
    depth = min(3000, (v.header_limit - 64) // 2)
    _, body = header_bytes(v)
    return pack('{"__metadata__":' + "[" * depth + "]" * depth + "}", body)


def huge_integer(v: Valid) -> bytes:
    """A 4,400-digit shape entry: over Python's int-parsing digit limit (a CPU-time DoS)."""
    header, body = split(v.data)
    header[v.keys[0]]["shape"] = ["HUGE"]  # placeholder: json.dumps refuses such an int too
    text = json.dumps(header, separators=(",", ":")).replace('"HUGE"', "1" + "0" * 4400)
    return pack(text, body)


def nan_in_header(v: Valid) -> bytes:
    header, body = split(v.data)
    header[v.keys[0]]["shape"] = [float("nan"), 1]
    return pack(json.dumps(header), body)  # json.dumps writes the non-standard NaN token


class _Payload:
    """Unpickling this creates PICKLE_SENTINEL: proof that something ran attacker code."""

    def __reduce__(self):
        return (os.mkdir, (str(PICKLE_SENTINEL),))


def pickle_plain(v: Valid) -> bytes:
    """What torch.save's legacy format writes: a pickle of the tensors as nested lists."""
    return pickle.dumps({k: [[0.0] * 4] for k in v.keys}, protocol=4)


def pickle_in_header(v: Valid) -> bytes:
    """A correct length prefix whose 'header' is a malicious pickle."""
    _, body = header_bytes(v)
    return pack(pickle.dumps(_Payload(), protocol=2), body)


def zip_archive(v: Valid) -> bytes:
    """The layout torch.save writes by default: a zip with data.pkl and raw storages."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(), protocol=2))
        z.writestr("archive/data/0", v.data[-4096:])
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def npy_file(v: Valid) -> bytes:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (16, 32), }"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(2048)


def html_page(v: Valid) -> bytes:
    """What a misconfigured store or proxy serves in place of the object."""
    return b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n"


def pad_to(v: Valid, size: int) -> bytes:
    return v.data + bytes(size - len(v.data))


def flip_last_bit(v: Valid) -> bytes:
    data = bytearray(v.data)
    data[-1] ^= 0x01
    return bytes(data)


# ---------------------------------------------------------------- compressed-encoding sources

RANK = 4  # of the low-rank sources; the random model's projections are [16, 32] and [32, 16]
MIN_SIDE = 16  # their smaller side: no factor may have a larger rank
SOURCE_ENCODINGS = ("int8", f"lowrank{RANK}", f"lowrank{RANK}-int8")


@lru_cache(maxsize=8)
def _reencode(data: bytes, encoding: str) -> bytes:
    from safetensors.torch import load, save

    from protocol.artifact.delta import DeltaMeta, encode_delta

    tensors = load(data)
    fields = {**json.loads(split(data)[0]["__metadata__"]["moesaic"]), "encoding": encoding}
    meta = DeltaMeta(**fields)
    return save(encode_delta(tensors, encoding), metadata={"moesaic": meta.to_json()})


def encoded(v: Valid, encoding: str) -> Valid:
    """The valid delta re-encoded as `encoding` by protocol.artifact.delta's writer (a valid file)."""
    return replace(v, data=_reencode(v.data, encoding))


def edit_wire(v: Valid, fn: Callable[[dict], None], **meta_changes) -> bytes:
    """Load the (valid, ours) file's tensors, let fn change them, save with safetensors' own
    writer (offsets and header re-made), the metadata changed by meta_changes."""
    from safetensors.torch import load, save

    wire = load(v.data)
    fn(wire)
    text = json.dumps({**meta_fields(v), **meta_changes}, sort_keys=True, separators=(",", ":"))
    return save({k: t.contiguous() for k, t in wire.items()}, metadata={"moesaic": text})


@dataclass(frozen=True)
class on:  # noqa: N801 - reads as a builder in the table: on("int8", drop_part(".scale"))
    """A builder applied to the valid delta re-encoded as `encoding` (its source)."""

    encoding: str
    build: Callable[[Valid], bytes]

    def __call__(self, v: Valid) -> bytes:
        return self.build(encoded(v, self.encoding))


def source_encoding(cls: ArtifactClass) -> str:
    """The encoding of the valid file a class's builder starts from."""
    return cls.build.encoding if isinstance(cls.build, on) else "float32"


def part(v: Valid, suffix: str = "") -> str:
    """The name of a part of the first projection: its hub key plus suffix."""
    return v.keys[0] + suffix


def set_part(suffix: str, value: float, index: int = 0):
    """Builder: element `index` (flattened) of the first projection's part set to value."""

    def build(v):
        def edit(wire):
            wire[part(v, suffix)].view(-1)[index] = value

        return edit_wire(v, edit)

    return build


def drop_part(suffix: str):
    """Builder: the first projection's part left out."""

    def build(v):
        return assemble([r for r in items(v) if r[0] != part(v, suffix)], metadata(v))

    return build


def retype_part(suffix: str, dtype: str):
    """Builder: the part's header dtype replaced; its bytes (same element size) kept."""
    return lambda v: edit_header(v, lambda h: h[part(v, suffix)].update(dtype=dtype))


def reshape_part(suffix: str, shape: Callable[[list[int]], list[int]]):
    """Builder: the part's header shape replaced (same element count); bytes kept."""
    return lambda v: edit_header(
        v, lambda h: h[part(v, suffix)].update(shape=shape(h[part(v, suffix)]["shape"]))
    )


def replace_part(suffix: str, fn: Callable):
    """Builder: the part's tensor replaced by fn(tensor) (any dtype or shape)."""

    def build(v):
        def edit(wire):
            wire[part(v, suffix)] = fn(wire[part(v, suffix)])

        return edit_wire(v, edit)

    return build


def add_part(suffix: str, shape: list[int]):
    """Builder: a zero float32 tensor named hub key + suffix added."""
    return lambda v: add_tensor(v, part(v, suffix), shape)


def pad_rank(rank: int):
    """Builder: every low-rank factor padded with zeros to `rank` (U [m, r] -> [m, rank],
    V [r, n] -> [rank, n]; scales of V's new rows 0): the product is unchanged."""

    def fn(wire):
        import torch

        for name in list(wire):
            t = wire[name]
            if name.endswith(".u"):
                wire[name] = torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1)
            elif name.endswith(".v"):
                wire[name] = torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])], dim=0)
            elif name.endswith(".v.scale"):
                wire[name] = torch.cat([t, t.new_zeros(rank - t.shape[0])])

    return fn


def fill_factors(u: float, v: float, su: float | None = None, sv: float | None = None):
    """Builder: the first projection's factors filled with u and v (and its scales with su,
    sv): small parts whose product is large."""

    def build(val):
        def edit(wire):
            wire[part(val, ".u")].fill_(u)
            wire[part(val, ".v")].fill_(v)
            if su is not None:
                wire[part(val, ".u.scale")].fill_(su)
                wire[part(val, ".v.scale")].fill_(sv)

        return edit_wire(val, edit)

    return build


def _c(name, code, threat, build, **kw) -> ArtifactClass:
    return ArtifactClass(name, code, threat, build, **kw)


# ---------------------------------------------------------------------------- the corpus

_HASH = "ab" * 32

# One row per class: name, expected code, threat, builder. Kept as a table, so unformatted.
# fmt: off
CLASSES: tuple[ArtifactClass, ...] = (
    # -- framing: the 8-byte length and the header's extent
    # A manifest cannot declare a 0-byte artifact (artifact_size >= 1), so on the fetch path
    # the miner's manifest is refused before any byte is fetched.
    _c("zero_byte_file", "truncated", "empty upload crashes the parser",
       lambda v: b"", fetch_code="malformed"),
    _c("shorter_than_length_prefix", "truncated", "read past the end of a 5-byte file",
       lambda v: v.data[:5]),
    _c("truncated_in_header", "header_size", "upload cut off inside the header",
       lambda v: v.data[: 8 + int.from_bytes(v.data[:8], "little") // 2]),
    _c("truncated_in_data", "offsets", "upload cut off inside the tensors",
       lambda v: v.data[:-64]),
    # Header only, the prefix within the header limit but past the end of the file.
    _c("header_length_beyond_file", "header_size", "length prefix points past the end",
       lambda v: pack(header_bytes(v)[0], header_len=len(header_bytes(v)[0]) + 100)),
    _c("header_length_u64_max", "header_size", "2**64-1 byte allocation",
       lambda v: pack(header_bytes(v)[0], header_bytes(v)[1], header_len=2**64 - 1)),
    _c("header_length_zero", "header_size", "empty header, data read as header",
       lambda v: pack(header_bytes(v)[0], header_bytes(v)[1], header_len=0)),
    _c("oversized_header", "header_size", "megabytes of JSON for the parser to chew",
       oversized_header),
    # -- the header's JSON
    _c("header_not_json", "header_json", "garbage header",
       lambda v: pack(b"this is not json, just text" + b" " * 40, header_bytes(v)[1])),
    _c("header_not_utf8", "header_json", "invalid UTF-8 confuses key comparison",
       lambda v: pack(header_bytes(v)[0].replace(b"__metadata__", b"__metadata\xff_"),
                      header_bytes(v)[1])),
    _c("header_utf8_bom", "header_json", "byte-order mark parsed differently by readers",
       lambda v: pack(b"\xef\xbb\xbf" + header_bytes(v)[0], header_bytes(v)[1])),
    _c("header_json_array", "header_json", "header of the wrong JSON type",
       lambda v: pack(b"[" + header_bytes(v)[0] + b"]", header_bytes(v)[1])),
    _c("header_nan_constant", "header_json", "non-standard NaN token in a shape",
       nan_in_header),
    _c("header_deep_nesting", "header_json", "recursion bomb in the JSON parser",
       deep_nesting),
    _c("header_huge_integer", "header_json", "4,400-digit number: quadratic int parsing",
       huge_integer),
    _c("header_trailing_nul", "header_json", "NUL padding where spaces belong",
       lambda v: pack(header_bytes(v)[0] + b"\0" * 8, header_bytes(v)[1])),
    _c("duplicate_tensor_key", "duplicate_key", "two entries for one key: readers disagree on which wins",
       lambda v: duplicate_pair(v, "tensor")),
    _c("duplicate_metadata_key", "duplicate_key", "two metadata blocks: claims differ by reader",
       lambda v: duplicate_pair(v, "metadata")),
    _c("duplicate_entry_field", "duplicate_key", "a field given twice inside one tensor entry",
       lambda v: duplicate_pair(v, "field")),
    # -- the metadata entry
    _c("missing_metadata", "metadata", "a delta that claims nothing",
       lambda v: with_metadata(v)),
    _c("metadata_not_object", "metadata", "metadata of the wrong JSON type",
       lambda v: with_metadata(v, ["moesaic", metadata(v)["moesaic"]])),
    _c("metadata_value_not_string", "metadata", "safetensors metadata values must be strings",
       lambda v: with_metadata(v, {"moesaic": meta_fields(v)})),
    _c("metadata_extra_entry", "metadata", "a second metadata entry breaks byte stability",
       lambda v: with_metadata(v, {**metadata(v), "note": "hi"})),
    _c("metadata_not_json", "metadata", "metadata entry is not JSON",
       lambda v: with_metadata(v, {"moesaic": "round=3"})),
    _c("metadata_duplicate_field", "metadata", "two rounds in one claim",
       lambda v: with_metadata(v, {"moesaic": metadata(v)["moesaic"][:-1] + ',"round":0}'})),
    _c("metadata_unknown_field", "metadata", "smuggled claims",
       lambda v: with_meta(v, score=1.0)),
    _c("metadata_missing_field", "metadata", "no token count claimed",
       lambda v: with_fields(v, {k: x for k, x in meta_fields(v).items() if k != "tokens"})),
    _c("wrong_format", "metadata", "another tool's file passed off as a delta",
       lambda v: with_meta(v, format="peft-lora")),
    _c("wrong_format_version", "metadata", "a future format read with today's rules",
       lambda v: with_meta(v, format_version=3)),
    _c("format_version_bool", "metadata", "JSON true passing as version 1",
       lambda v: with_meta(v, format_version=True)),
    _c("negative_round", "metadata", "round -1 wraps in unsigned comparisons",
       lambda v: with_meta(v, round=-1)),
    _c("round_as_float", "metadata", "3.0 passing as round 3",
       lambda v: with_meta(v, round=float(v.round))),
    _c("unknown_encoding", "metadata", "data read with rules made up for an unknown encoding",
       lambda v: with_meta(v, encoding="int4")),
    # Encoding names: one spelling per rank, the rank bounded before it is ever parsed.
    _c("encoding_lowrank_zero", "metadata", "rank 0: empty factors that decode to nothing",
       lambda v: with_meta(v, encoding="lowrank0")),
    _c("encoding_lowrank_negative", "metadata", "a negative rank reaching shape arithmetic",
       lambda v: with_meta(v, encoding="lowrank-3")),
    _c("encoding_lowrank_leading_zero", "metadata", "'lowrank08': two names for one encoding",
       lambda v: with_meta(v, encoding="lowrank08")),
    _c("encoding_lowrank_not_a_number", "metadata", "a rank that is not a number",
       lambda v: with_meta(v, encoding="lowrankX")),
    _c("encoding_lowrank_no_rank", "metadata", "a low-rank encoding without a rank",
       lambda v: with_meta(v, encoding="lowrank")),
    _c("encoding_lowrank_rank_too_large", "metadata", "a rank above any projection's side",
       lambda v: with_meta(v, encoding="lowrank65537")),
    _c("encoding_lowrank_huge_digits", "metadata", "a 4,400-digit rank: quadratic int parsing",
       lambda v: with_meta(v, encoding="lowrank" + "9" * 4400)),
    _c("encoding_unknown_factor_type", "metadata", "int4 factors read as int8",
       lambda v: with_meta(v, encoding="lowrank8-int4")),
    _c("wrong_base_hash", "base_hash", "a delta trained on another base",
       lambda v: with_meta(v, base_hash=_HASH)),
    _c("wrong_assignment_hash", "assignment_hash", "a delta for another expert assignment",
       lambda v: with_meta(v, assignment_hash=_HASH)),
    _c("wrong_round", "round", "replay of a delta from another round",
       lambda v: with_meta(v, round=v.round + 1)),
    _c("wrong_shard", "wrong_shard", "trained on another miner's shard, or on one shard every round",
       lambda v: with_meta(v, shard=_HASH)),
    # -- tensor entries
    _c("wrong_dtype", "dtype", "float64 data: twice the bytes, another decoder",
       lambda v: entry_edit(v, 0, dtype="F64")),
    _c("terminal_escape_dtype", "dtype", "ANSI escapes in a dtype shown by inspect",
       lambda v: entry_edit(v, 0, dtype="\x1b[2JF32")),
    _c("dtype_disagrees_with_encoding", "dtype", "metadata says bf16, tensors are f32",
       lambda v: with_meta(v, encoding="bfloat16")),
    _c("wrong_shape", "shape", "transposed projection applied to the wrong axis",
       lambda v: edit_header(v, lambda h: h[v.keys[0]].update(shape=h[v.keys[0]]["shape"][::-1]))),
    _c("shape_not_integers", "shape", "float dimensions",
       lambda v: edit_header(
           v, lambda h: h[v.keys[0]].update(shape=[float(d) for d in h[v.keys[0]]["shape"]]))),
    _c("entry_extra_field", "header_json", "unknown fields in a tensor entry",
       lambda v: entry_edit(v, 0, note="x")),
    _c("entry_not_object", "header_json", "a tensor entry of the wrong JSON type",
       lambda v: edit_header(v, lambda h: h.__setitem__(v.keys[0], "F32"))),
    # -- offsets and the data section
    _c("overlapping_offsets", "offsets", "two tensors share bytes: one write shows up twice",
       overlap),
    _c("out_of_bounds_offsets", "offsets", "read past the data section",
       lambda v: shift_last(v, lambda b, e, n: [n, n + (e - b)])),
    _c("negative_offsets", "offsets", "read before the data section",
       lambda v: shift_last(v, lambda b, e, n: [-(e - b), 0])),
    _c("offsets_not_a_pair", "offsets", "offsets of the wrong form",
       lambda v: shift_last(v, lambda b, e, n: [str(b), str(e)])),
    _c("data_gap", "offsets", "hidden bytes between tensors (a covert payload)",
       insert_gap),
    _c("trailing_garbage", "offsets", "hidden bytes after the last tensor",
       lambda v: v.data + b"PK\x03\x04hidden-zip-payload" + bytes(40)),
    # -- keys
    _c("expert_outside_assignment", "unexpected_key", "training experts nobody assigned",
       lambda v: rename_first_expert(v, expert=str(unassigned_expert(v)[1]))),
    _c("expert_in_missing_layer", "unexpected_key", "writes to a layer the model lacks",
       lambda v: rename_first_expert(v, layer=1000)),
    _c("expert_index_leading_zero", "unexpected_key", "'01' parsed as expert 1 by a lax reader",
       lambda v: rename_first_expert(v, expert="0" + _KEY_RE.match(v.keys[0])["expert"])),
    _c("homoglyph_key", "unexpected_key", "a Cyrillic letter in a look-alike key",
       lambda v: edit_rows(v, lambda rows: rows[0].__setitem__(
           0, rows[0][0].replace("experts", "\u0435xperts")))),
    # json.dumps writes the lone surrogate as the escape \ud800, which json.loads accepts:
    # the key is a str no UTF-8 stream can encode (a crash in any naive error printer).
    _c("lone_surrogate_key", "unexpected_key", "an unencodable key crashing error reporting",
       lambda v: edit_rows(v, lambda rows: rows[0].__setitem__(0, rows[0][0] + "\ud800"))),
    _c("terminal_escape_key", "unexpected_key", "ANSI escapes rewriting an operator's terminal",
       lambda v: add_tensor(v, "\x1b[2J\x1b[32mOK all experts verified\x1b[0m", [1])),
    _c("extra_attention_tensor", "unexpected_key", "attention weights changed through a delta",
       lambda v: add_tensor(v, "model.layers.0.self_attn.q_proj.weight", [4, v.hidden])),
    _c("extra_router_tensor", "unexpected_key", "router rewired to favour the miner's experts",
       lambda v: add_tensor(v, "model.layers.0.mlp.gate.weight", [v.num_experts, v.hidden])),
    # A few rows only: the whole embedding matrix is larger than the cap and would be refused
    # as too_large before its key is looked at.
    _c("extra_embedding_tensor", "unexpected_key", "token embeddings changed through a delta",
       lambda v: add_tensor(v, "model.embed_tokens.weight", [4, v.hidden])),
    _c("extra_shared_expert_tensor", "unexpected_key", "a frozen shared expert trained",
       lambda v: add_tensor(v, "model.layers.0.mlp.shared_expert.up_proj.weight", [4, v.hidden])),
    # The reader requires every assigned expert: a partial delta would be scored as if the
    # missing experts were unchanged, and merged with weight on experts it never trained.
    _c("missing_assigned_expert", "missing_key", "a partial delta scored as complete",
       drop_last_expert),
    # -- values
    _c("nan_value", "nonfinite", "NaN poisons every loss it touches",
       lambda v: set_first_value(v, float("nan"))),
    _c("inf_value", "nonfinite", "+Inf overflows the merge",
       lambda v: set_first_value(v, float("inf"))),
    _c("negative_inf_value", "nonfinite", "-Inf overflows the merge",
       lambda v: set_first_value(v, float("-inf"))),
    _c("huge_value", "magnitude", "a finite 1e30 that wrecks the model once merged",
       lambda v: set_first_value(v, 1e30)),
    # A well-formed delta that changes nothing: free to make, it only costs validators time.
    _c("zero_delta", "zero", "an all-zero delta passed off as work (and verified as valid)",
       zero_values),
    _c("int8_zero_scales", "zero", "nonzero int8 bytes whose scales of 0 decode to nothing",
       on("int8", zero_parts(".scale"))),
    # -- int8: int8 values under the hub key, one float32 scale per row under <key>.scale
    _c("int8_missing_scale", "missing_key", "int8 values with no scale: decoded by guesswork",
       on("int8", drop_part(".scale"))),
    _c("int8_negative_scale", "scale", "a negative scale: a second spelling of the same delta",
       on("int8", set_part(".scale", -1e-3))),
    _c("int8_nan_scale", "nonfinite", "a NaN scale poisons its whole row",
       on("int8", set_part(".scale", float("nan")))),
    _c("int8_inf_scale", "nonfinite", "an infinite scale overflows its row",
       on("int8", set_part(".scale", float("inf")))),
    _c("int8_scale_in_bfloat16", "dtype", "scales in another dtype than the encoding's",
       on("int8", replace_part(".scale", lambda t: t.bfloat16()))),
    _c("int8_values_as_uint8", "dtype", "unsigned bytes read as signed values",
       on("int8", retype_part("", "U8"))),
    _c("int8_scale_wrong_shape", "shape", "a scale per column applied per row",
       on("int8", reshape_part(".scale", lambda s: [*s, 1]))),
    _c("int8_extra_part", "unexpected_key", "a smuggled zero point shifting every value",
       on("int8", add_part(".zero_point", [16]))),
    _c("int8_file_claiming_bfloat16", "unexpected_key", "int8 parts read as a bf16 delta",
       on("int8", lambda v: with_meta(v, encoding="bfloat16"))),
    _c("int8_values_claiming_bfloat16", "dtype", "int8 data read as float",
       on("int8", lambda v: with_fields(replace(v, data=assemble(
           [r for r in items(v) if not r[0].endswith(".scale")], metadata(v))),
           {**meta_fields(v), "encoding": "bfloat16"}))),
    _c("int8_decoded_over_max_abs", "magnitude", "a finite scale that decodes to 127 x 100",
       on("int8", set_part(".scale", 100.0))),
    # -- lowrank<R>: bf16 factors <key>.u [m, r], <key>.v [r, n], r = min(R, m, n)
    _c("lowrank_factor_transposed", "shape", "U [r, m] read as [m, r]: a scrambled product",
       on(f"lowrank{RANK}", reshape_part(".u", lambda s: s[::-1]))),
    _c("lowrank_rank_above_encoding", "shape", "more rank (bytes, compute) than the name says",
       on(f"lowrank{RANK}", lambda v: edit_wire(v, pad_rank(RANK + 1)))),
    _c("lowrank_rank_above_min_side", "shape", "a rank no [16, 32] matrix has (a decode-cost DoS)",
       on(f"lowrank{RANK}", lambda v: edit_wire(v, pad_rank(MIN_SIDE + 1), encoding="lowrank64"))),
    _c("lowrank_wider_than_dense", "rank", "rank-12 factors of a [16, 32] matrix: more numbers "
       "than dense, a decode-cost abuse", on(f"lowrank{RANK}", lambda v: edit_wire(
           v, pad_rank(12), encoding="lowrank12"))),
    _c("lowrank_missing_factor", "missing_key", "U without V: decoded by guesswork",
       on(f"lowrank{RANK}", drop_part(".v"))),
    _c("lowrank_factor_float32", "dtype", "float32 factors: twice the bytes, another decoder",
       on(f"lowrank{RANK}", replace_part(".u", lambda t: t.float()))),
    _c("lowrank_factor_float16", "dtype", "bf16 bits read as fp16: other values",
       on(f"lowrank{RANK}", retype_part(".v", "F16"))),
    _c("lowrank_extra_singular_values", "unexpected_key", "a smuggled third factor",
       on(f"lowrank{RANK}", add_part(".s", [RANK]))),
    _c("lowrank_nan_factor", "nonfinite", "NaN in a factor poisons a whole row and column",
       on(f"lowrank{RANK}", set_part(".u", float("nan")))),
    _c("lowrank_product_over_max_abs", "magnitude", "factors of 20 whose product is 1,600",
       on(f"lowrank{RANK}", fill_factors(20.0, 20.0))),
    _c("lowrank_product_overflows", "nonfinite", "finite 1e20 factors whose product is inf",
       on(f"lowrank{RANK}", fill_factors(1e20, 1e20))),
    # -- lowrank<R>-int8: int8 factors with float32 scales <key>.u.scale [r], <key>.v.scale [r]
    _c("lowrank_int8_missing_scale", "missing_key", "int8 factors with no scale",
       on(f"lowrank{RANK}-int8", drop_part(".u.scale"))),
    _c("lowrank_int8_negative_scale", "scale", "a negative scale: a second spelling",
       on(f"lowrank{RANK}-int8", set_part(".v.scale", -1e-3))),
    _c("lowrank_int8_nan_scale", "nonfinite", "a NaN scale poisons a factor row",
       on(f"lowrank{RANK}-int8", set_part(".u.scale", float("nan")))),
    _c("lowrank_int8_inf_scale", "nonfinite", "an infinite scale overflows a factor row",
       on(f"lowrank{RANK}-int8", set_part(".v.scale", float("inf")))),
    _c("lowrank_int8_scale_wrong_dtype", "dtype", "float bits read as integers",
       on(f"lowrank{RANK}-int8", retype_part(".v.scale", "I32"))),
    _c("lowrank_int8_factor_wrong_dtype", "dtype", "unsigned bytes read as signed factors",
       on(f"lowrank{RANK}-int8", retype_part(".u", "U8"))),
    _c("lowrank_int8_scale_wrong_shape", "shape", "one scale too many: rows misaligned",
       on(f"lowrank{RANK}-int8", replace_part(".u.scale", lambda t: t.repeat(2)[: t.numel() + 1]))),
    _c("lowrank_int8_claiming_bfloat16_factors", "unexpected_key", "int8 factors read as bf16",
       on(f"lowrank{RANK}-int8", lambda v: with_meta(v, encoding=f"lowrank{RANK}"))),
    _c("lowrank_int8_product_over_max_abs", "magnitude", "factors of 25.4 whose product is 2,580",
       on(f"lowrank{RANK}-int8", fill_factors(127, 127, 0.2, 0.2))),
    # -- other formats under a .safetensors name
    _c("pickle_disguised", "header_size", "a pickle: arbitrary code on load",
       pickle_plain),
    _c("malicious_pickle_in_header", "header_json", "a code-running pickle behind a valid prefix",
       pickle_in_header),
    _c("zip_disguised", "header_size", "torch.save zip with a pickle inside",
       zip_archive),
    _c("npy_disguised", "header_size", "a numpy array file", npy_file),
    _c("gzip_disguised", "header_size", "a compressed delta (a decompression bomb vector)",
       lambda v: gzip.compress(v.data, mtime=0)),
    _c("html_error_page", "header_size", "a proxy's error page stored as the artifact",
       html_page),
    # -- size and integrity
    # On the fetch path the manifest's declared size is over the validator's cap, so the
    # manifest is refused and not a byte of the artifact is fetched.
    _c("larger_than_cap", "too_large", "a multi-gigabyte upload exhausting validators",
       lambda v: pad_to(v, v.cap + 1), fetch_code="too_large"),
    # The commitment names the valid file; the bytes served differ by one bit. The store
    # checks the digest while downloading, so the fetch path never hands them to the reader.
    _c("sha256_mismatch", "sha256", "bytes swapped after the commitment",
       flip_last_bit, fetch_code="unavailable", claims_valid_sha=True),
)
# fmt: on


def by_name() -> dict[str, ArtifactClass]:
    return {c.name: c for c in CLASSES}
