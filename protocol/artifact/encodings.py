"""Delta wire encodings: their names and the tensors each one puts in the file (no torch).

An encoding name is one of

- ``float32``, ``bfloat16``, ``float16``: dense, one tensor per projection under its hub key;
- ``int8``: symmetric absmax int8 per row, the int8 values under the hub key and one float32
  scale per row under ``<key>.scale``;
- ``lowrank<R>``: factors U [m, r] and V [r, n] (W ~ U @ V) in bfloat16 under ``<key>.u`` and
  ``<key>.v``, r = min(R, m, n);
- ``lowrank<R>-int8``: the same factors as int8 with one float32 scale per row under
  ``<key>.u.scale`` [r] (U per column) and ``<key>.v.scale`` [r] (V per row).

R is written in decimal without sign or leading zeros, 1 <= R <= MAX_RANK (``lowrank8``,
``lowrank8-int8``; not ``lowrank0``, ``lowrank08``, ``lowrank-3``, ``lowrankX``): every rank
has exactly one name. `wire_entries` is the exact set of (name, dtype, shape) a file of an
encoding holds for one projection, so the untrusted reader (protocol.artifact.untrusted) can check a
header completely before it allocates anything, and `payload_bytes` is the exact size of those
tensors' data. The tensor maths (encode, decode) lives in protocol.artifact.delta.

Torch-free so that protocol.round.manifest (which carries the encoding name) can validate it.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

DENSE = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
MAX_RANK = 65536  # above any expert projection's smaller side; bounds the name's digits
SCALE_DTYPE = ("F32", 4)  # per-row scales: exact, so |error| <= scale/2 holds as stated
MAX_ENTRIES_PER_PROJECTION = 4  # lowrank<R>-int8: u, v and their scales
ENCODING_HELP = (
    "float32, bfloat16, float16, int8, lowrank<R> (bfloat16 factors) or lowrank<R>-int8 "
    f"(int8 factors), R an integer 1..{MAX_RANK} without leading zeros, e.g. lowrank8, "
    "lowrank8-int8"
)
_LOWRANK = re.compile(r"lowrank([1-9][0-9]{0,5})(-int8)?")


@dataclass(frozen=True)
class Encoding:
    """A parsed encoding name."""

    name: str
    kind: str  # "dense", "int8" or "lowrank"
    rank: int | None = None  # R of lowrank<R>
    int8: bool = False  # int8 values with per-row scales (int8, lowrank<R>-int8)

    @property
    def lossless(self) -> bool:
        """True for the dense encodings: what they round away is below training noise, and
        a miner keeps no error-feedback residual for them."""
        return self.kind == "dense"

    def rank_for(self, shape: tuple[int, int]) -> int:
        """The factor rank r = min(R, m, n) of a projection of `shape` (lowrank only)."""
        if self.rank is None:
            raise ValueError(f"encoding {self.name} has no rank")
        return min(self.rank, *shape)


def parse_encoding(name) -> Encoding:
    """The Encoding named `name`, or ValueError listing the valid names."""
    if isinstance(name, Encoding):
        return name
    if isinstance(name, str):
        if name in DENSE:
            return Encoding(name, "dense")
        if name == "int8":
            return Encoding(name, "int8", int8=True)
        m = _LOWRANK.fullmatch(name)
        if m and int(m[1]) <= MAX_RANK:
            return Encoding(name, "lowrank", rank=int(m[1]), int8=bool(m[2]))
    shown = repr(name) if not isinstance(name, str) or len(name) <= 40 else repr(name[:40] + "...")
    raise ValueError(f"encoding {shown} unknown; one of {ENCODING_HELP}")


def encoding_arg(name: str) -> str:
    """An argparse `type=`: the encoding's canonical name, or a usage error listing them."""
    try:
        return parse_encoding(name).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def rank_problem(encoding: str | Encoding, shape: tuple[int, int]) -> str | None:
    """Why a low-rank encoding must not be used on a projection of `shape`, or None.

    Factors that hold more numbers than the dense matrix, r (m + n) > m n, are never smaller
    on the wire and cost a validator an m x r x n product to decode (1.2 GFLOP per [768, 2048]
    projection at full rank): miners are refused them when writing, validators reject them.
    """
    enc = parse_encoding(encoding)
    if enc.kind != "lowrank":
        return None
    m, n = shape
    r = enc.rank_for(shape)
    if r * (m + n) <= m * n:
        return None
    return (
        f"{enc.name} on a [{m}, {n}] projection stores {r * (m + n):,} factor numbers, more "
        f"than the dense matrix's {m * n:,} (rank {r} > {m * n / (m + n):.1f}): use a dense "
        "encoding"
    )


def is_encoding(name) -> bool:
    try:
        parse_encoding(name)
    except ValueError:
        return False
    return True


def wire_entries(
    encoding: str | Encoding, key: str, shape: tuple[int, int]
) -> list[tuple[str, str, list[int]]]:
    """(tensor name, safetensors dtype, shape) of every tensor holding projection `key`."""
    enc = parse_encoding(encoding)
    m, n = shape
    if enc.kind == "dense":
        return [(key, DENSE[enc.name][0], [m, n])]
    scale = SCALE_DTYPE[0]
    if enc.kind == "int8":
        return [(key, "I8", [m, n]), (f"{key}.scale", scale, [m])]
    r = enc.rank_for(shape)
    if not enc.int8:
        return [(f"{key}.u", "BF16", [m, r]), (f"{key}.v", "BF16", [r, n])]
    return [
        (f"{key}.u", "I8", [m, r]),
        (f"{key}.u.scale", scale, [r]),
        (f"{key}.v", "I8", [r, n]),
        (f"{key}.v.scale", scale, [r]),
    ]


ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}
PART_SUFFIXES = (".u.scale", ".v.scale", ".scale", ".u", ".v")  # longest first


def hub_key_of(name: str) -> str:
    """The hub key a stored tensor belongs to: its name less a part suffix (for display and
    decoding; the reader checks names against `wire_entries` exactly)."""
    for suffix in PART_SUFFIXES:
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)]
    return name


def payload_bytes(encoding: str | Encoding, shape: tuple[int, int]) -> int:
    """Exact bytes of data one projection of `shape` takes in a file of `encoding`."""
    total = 0
    for _, dtype, dims in wire_entries(encoding, "k", shape):
        count = 1
        for d in dims:
            count *= d
        total += count * ITEMSIZE[dtype]
    return total


def widest_payload_bytes(shape: tuple[int, int]) -> int:
    """The most data bytes any encoding can give one projection (lowrank at full rank
    included): float32 for every shape with both sides >= 4, the others only below that."""
    full = min(shape)
    return max(
        payload_bytes(name, shape)
        for name in (*DENSE, "int8", f"lowrank{full}", f"lowrank{full}-int8")
    )
