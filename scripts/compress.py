"""Benchmark-only delta compression schemes (scripts/bench.py): pure encode/decode over delta dicts.

The schemes that ship on the wire live in protocol.artifact.wire; these are the candidates the
benchmark compares them with.

A delta maps hub per-expert keys to float tensors (`protocol.artifact.delta`). `encode(delta, spec)`
returns an `Encoded` (named wire tensors + the original shapes), `Encoded.wire_bytes()` is the
exact size of its safetensors serialisation (`to_bytes`), and `decode(encoded)` gives float32
tensors of the original shapes back. Schemes (`spec` strings):

- ``fp32``        identity, the reference (4 bytes per value).
- ``bf16``        round to bfloat16 (2 bytes per value; relative error <= 2^-8).
- ``int8``        symmetric int8 per row (a row is one output channel of an expert projection
                  [out, in]) with one float32 scale per row: |error| <= scale/2 = rowmax/254.
- ``topk:D``      per tensor, keep the ceil(D * n) largest magnitudes; values int8 with one
                  float32 scale per tensor, positions as int16 column indices plus int16 per-row
                  counts (int32 when a row is wider than int16 can index), ~3 bytes per kept value.
- ``lowrank:F``   per tensor, the best rank-r approximation (truncated SVD, Eckart-Young) with
                  r = max(1, round(F * min(out, in))), factors in bfloat16.

Lossy schemes drop information every round; `ErrorFeedback` is the miner-side state that adds
what was dropped to the next round's delta (Seide et al. 2014; Karimireddy et al. 2019), so the
sum of what is sent tracks the sum of what was trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from protocol.artifact.wire import int8_symmetric

Delta = dict[str, torch.Tensor]

METADATA_KEY = "moesaic-compress"
_INT16_MAX = 32767
# Below this smaller dimension the exact SVD is cheap; above it the randomized one is used
# (an expert projection of a 30B-class model is 768 x 2048).
_EXACT_SVD_MAX_DIM = 256


@dataclass(frozen=True)
class Spec:
    """A parsed scheme name: kind plus its one parameter (density or rank fraction)."""

    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, spec: str | Spec) -> Spec:
        if isinstance(spec, Spec):
            return spec
        kind, _, arg = str(spec).partition(":")
        if kind in ("fp32", "bf16", "int8"):
            if arg:
                raise ValueError(f"scheme {kind!r} takes no parameter, got {spec!r}")
            return cls(kind)
        if kind in ("topk", "lowrank"):
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"{kind} needs a number: {kind}:0.01, got {spec!r}") from None
            if not 0 < value <= 1:
                raise ValueError(f"{kind} parameter must be in (0, 1], got {value}")
            return cls(kind, value)
        raise ValueError(f"unknown scheme {spec!r}; one of fp32, bf16, int8, topk:D, lowrank:F")

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def lossless(self) -> bool:
        return self.kind == "fp32"


@dataclass(frozen=True)
class Encoded:
    """A compressed delta: wire tensors named "<key>/<part>" and each key's original shape."""

    spec: str
    payload: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]

    def payload_bytes(self) -> int:
        """Bytes of the tensor data alone (the estimate; `wire_bytes` adds the header)."""
        return sum(t.numel() * t.element_size() for t in self.payload.values())

    def _metadata(self) -> dict[str, str]:
        body = {"spec": self.spec, "shapes": {k: list(v) for k, v in sorted(self.shapes.items())}}
        return {METADATA_KEY: json.dumps(body, sort_keys=True, separators=(",", ":"))}

    def to_bytes(self) -> bytes:
        """The safetensors serialisation: what would travel (same content -> same bytes)."""
        from safetensors.torch import save

        return save({k: t.contiguous() for k, t in self.payload.items()}, self._metadata())

    def wire_bytes(self) -> int:
        """Exact length of `to_bytes()`: the 8-byte length, the JSON header and the data."""
        return len(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Encoded:
        """Parse `to_bytes` output (trusted input: validators need a hardened reader first)."""
        from safetensors.torch import load

        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        body = json.loads(header["__metadata__"][METADATA_KEY])
        shapes = {k: tuple(v) for k, v in body["shapes"].items()}
        return cls(body["spec"], load(data), shapes)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View as [rows, cols]: a projection [out, in] as is; anything else flattened sensibly."""
    t = t.detach().to(device="cpu", dtype=torch.float32)
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def _index_dtype(limit: int) -> torch.dtype:
    return torch.int16 if limit <= _INT16_MAX else torch.int32


def _encode_topk(key: str, x: torch.Tensor, density: float, out: dict) -> None:
    m, n = x.shape
    k = min(x.numel(), max(1, math.ceil(density * x.numel())))
    flat = x.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    rows, cols = idx // n, idx % n
    values = flat[idx]
    q, scale = int8_symmetric(values, values.abs().max().reshape(1))
    out[f"{key}/cols"] = cols.to(_index_dtype(n - 1))
    # Kept positions are sorted, so per-row counts locate every column index: cheaper than a
    # row index per value once a row keeps more than a couple of values.
    out[f"{key}/counts"] = torch.bincount(rows, minlength=m).to(_index_dtype(n))
    out[f"{key}/q"] = q
    out[f"{key}/scale"] = scale


def _decode_topk(key: str, shape: tuple[int, int], p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    m, n = shape
    counts = p[f"{key}/counts"].long()
    rows = torch.repeat_interleave(torch.arange(m), counts)
    flat = torch.zeros(m * n, dtype=torch.float32)
    flat[rows * n + p[f"{key}/cols"].long()] = p[f"{key}/q"].float() * p[f"{key}/scale"]
    return flat.reshape(m, n)


def _rank(fraction: float, shape: tuple[int, int]) -> int:
    return max(1, min(min(shape), round(fraction * min(shape))))


def _encode_lowrank(key: str, x: torch.Tensor, fraction: float, out: dict) -> None:
    r = _rank(fraction, tuple(x.shape))
    if min(x.shape) <= _EXACT_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        left, right = u[:, :r] * s[:r], vh[:r].T
    else:
        # Randomized SVD with a fixed seed: the same delta always encodes to the same bytes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(x, q=min(min(x.shape), r + 8), niter=4)
        left, right = u[:, :r] * s[:r], v[:, :r]
    out[f"{key}/left"] = left.to(torch.bfloat16)
    out[f"{key}/right"] = right.to(torch.bfloat16)


def encode(delta: Mapping[str, torch.Tensor], spec: str | Spec) -> Encoded:
    """Compress every tensor of `delta` with one scheme (see the module docstring)."""
    s = Spec.parse(spec)
    if not delta:
        raise ValueError("nothing to encode: the delta is empty")
    payload: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key in sorted(delta):
        t = delta[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{key}: delta values must be floating-point tensors")
        if "/" in key:
            raise ValueError(f"{key}: '/' is reserved for wire part names")
        shapes[key] = tuple(t.shape)
        x = _rows(t)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{key}: non-finite values cannot be encoded")
        if s.kind == "fp32":
            payload[f"{key}/values"] = x.clone()
        elif s.kind == "bf16":
            payload[f"{key}/values"] = x.to(torch.bfloat16)
        elif s.kind == "int8":
            q, scale = int8_symmetric(x, x.abs().amax(dim=1, keepdim=True))
            payload[f"{key}/q"], payload[f"{key}/scale"] = q, scale.reshape(-1)
        elif s.kind == "topk":
            _encode_topk(key, x, s.param, payload)
        else:
            _encode_lowrank(key, x, s.param, payload)
    return Encoded(str(s), payload, shapes)


def decode(encoded: Encoded) -> Delta:
    """float32 tensors of the original shapes, keyed like the encoded delta."""
    s = Spec.parse(encoded.spec)
    p = encoded.payload
    out: Delta = {}
    for key, shape in encoded.shapes.items():
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // rows if rows else 0
        if s.kind in ("fp32", "bf16"):
            x = p[f"{key}/values"].float()
        elif s.kind == "int8":
            x = p[f"{key}/q"].float() * p[f"{key}/scale"].reshape(-1, 1)
        elif s.kind == "topk":
            x = _decode_topk(key, (rows, cols), p)
        else:
            x = p[f"{key}/left"].float() @ p[f"{key}/right"].float().T
        out[key] = x.reshape(shape).contiguous()
    return out


def roundtrip(delta: Mapping[str, torch.Tensor], spec: str | Spec) -> tuple[Delta, int]:
    """(decode(encode(delta)), wire bytes): what a receiver gets and what it cost."""
    enc = encode(delta, spec)
    return decode(enc), enc.wire_bytes()


class ErrorFeedback:
    """A miner's compression memory across rounds: send C(delta + residual), keep the rest.

    After every `encode`, residual = (delta + previous residual) - decode(sent), so over rounds
    sum(sent) = sum(delta) - residual: nothing is lost, only delayed. A key that leaves the
    miner's assignment cannot be shipped any more, so its residual is dropped (and counted in
    `dropped_norm`).
    """

    def __init__(self, spec: str | Spec):
        self.spec = Spec.parse(spec)
        self.residual: Delta = {}
        self.dropped_norm = 0.0

    def encode(self, delta: Mapping[str, torch.Tensor]) -> Encoded:
        stale = set(self.residual) - set(delta)
        self.dropped_norm += math.sqrt(sum(float(self.residual[k].norm()) ** 2 for k in stale))
        corrected = {}
        for k, t in delta.items():
            x = t.detach().to(device="cpu", dtype=torch.float32)
            corrected[k] = x + self.residual[k] if k in self.residual else x
        enc = encode(corrected, self.spec)
        sent = decode(enc)
        self.residual = {k: corrected[k] - sent[k] for k in corrected}
        return enc

    def residual_norm(self) -> float:
        return math.sqrt(sum(float(t.norm()) ** 2 for t in self.residual.values()))
