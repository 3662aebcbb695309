"""Fixed-size sketches of expert deltas, for copy detection at any model size.

A validator compares every delta of a round with every other one and with the deltas of the
last rounds (a replayed delta is a copy of its original). Holding all of them as dense tensors
costs (miners x rounds) full deltas of memory - about 7 GB each for a Qwen3-30B-A3B assignment -
so each delta is reduced once to a count sketch of `SKETCH_DIM` numbers:

    vector[b] = sum over elements i with i mod dim == b of sign_i * x_i

where i is the element's position in the delta flattened in sorted-key order and sign_i is a
pseudo-random +-1 drawn from the validator's secret and the tensor's key. For any two deltas
x, y, <Sx, Sy> estimates <x, y> without bias (the cross terms have random signs), so cosine
similarity of sketches estimates cosine similarity of deltas with a standard error of about
1/sqrt(dim) (0.004 at 2^16). When a delta has at most `dim` elements nothing collides and the
cosine is exact, so small models keep exact duplicate detection.

Why the signs are secret: with public signs a copycat could add a small perturbation aligned
with the sketch's largest direction (all same-sign elements of one bucket) and move the sketch
far while the delta stays a near-copy. With unknown signs, any perturbation moves the sketch
by its own norm on average, so the sketch cosine tracks the true one. Each validator draws its
own secret once (`load_or_create_secret`) and keeps it with its state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from protocol.artifact.delta import delta_shapes
from protocol.ops.atomic import write_bytes_atomic

SKETCH_DIM = 1 << 16
SECRET_BYTES = 32
_FILE_KEY = "moesaic-sketch"


@dataclass(frozen=True)
class Sketch:
    """A delta reduced to `vector`; only sketches with equal `signature` (same keys and
    shapes) and `key_id` (same secret) are comparable."""

    signature: str  # sha256 of the sorted (key, shape) list
    key_id: str  # first 16 hex digits of sha256(secret): which secret drew the signs
    vector: torch.Tensor  # float32 [min(elements, dim)]


def signature(tensors: Mapping[str, torch.Tensor]) -> str:
    known = delta_shapes(tensors)
    shapes = [[k, list(known[k])] for k in sorted(known)]
    return hashlib.sha256(json.dumps(shapes, separators=(",", ":")).encode()).hexdigest()


def key_id(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()[:16]


def _signs(secret: bytes, key: str, n: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(secret + b"\0" + key.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)


def sketch(tensors: Mapping[str, torch.Tensor], *, secret: bytes, dim: int = SKETCH_DIM) -> Sketch:
    """The count sketch of a delta (see the module docstring); tensors may be any float dtype,
    or a WireDelta (each projection decoded once, then dropped)."""
    if not tensors:
        raise ValueError("cannot sketch an empty delta")
    if dim <= 0:
        raise ValueError(f"sketch dim must be positive, got {dim}")
    total = sum(math.prod(shape) for shape in delta_shapes(tensors).values())
    size = min(total, dim)
    vec = torch.zeros(size, dtype=torch.float64)
    offset = 0
    for k in sorted(tensors):
        x = tensors[k].detach().reshape(-1).to("cpu", torch.float64)
        n = x.numel()
        signed = x * _signs(secret, k, n).double()
        idx = torch.arange(offset, offset + n, dtype=torch.long).remainder_(size)
        vec.index_add_(0, idx, signed)
        offset += n
    return Sketch(signature(tensors), key_id(secret), vec.float())


def cosines(sketches: Mapping[str, Sketch]) -> dict[tuple[str, str], float]:
    """Cosine of every comparable pair, keyed (a, b) with a < b; a zero sketch has cosine 0
    with everything. Incomparable pairs (other keys/shapes or secret) are absent."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(sketches):
        s = sketches[name]
        groups.setdefault((s.signature, s.key_id), []).append(name)
    out: dict[tuple[str, str], float] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        rows = torch.stack([sketches[n].vector.double() for n in names])
        norms = rows.norm(dim=1, keepdim=True)
        rows.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
        gram = (rows @ rows.T).clamp(-1.0, 1.0)
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                out[(a, names[j])] = float(gram[i, j])
    return out


# ----------------------------------------------------------------------------- persistence


def load_or_create_secret(path: str | Path) -> bytes:
    """The validator's sketch secret: read it, or draw and store it (0600, atomically)."""
    path = Path(path)
    if path.exists():
        secret = path.read_bytes()
        if len(secret) != SECRET_BYTES:
            raise ValueError(
                f"{path} holds {len(secret)} bytes, not a {SECRET_BYTES}-byte sketch secret; "
                "move it away to draw a new one (earlier rounds' sketches are then recomputed)"
            )
        return secret
    secret = os.urandom(SECRET_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, secret)
    path.chmod(0o600)
    return secret


def save_sketches(path: str | Path, sketches: Mapping[str, Sketch]) -> None:
    """One safetensors file of named sketches, written atomically."""
    names = sorted(sketches)
    meta = {n: [sketches[n].signature, sketches[n].key_id] for n in names}
    tensors = {f"s{i}": sketches[n].vector.contiguous() for i, n in enumerate(names)}
    data = save(tensors, metadata={_FILE_KEY: json.dumps({"names": names, "meta": meta})})
    write_bytes_atomic(path, data)


def load_sketches(path: str | Path) -> dict[str, Sketch]:
    """Read what `save_sketches` wrote (our own state file); ValueError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            doc = json.loads((f.metadata() or {})[_FILE_KEY])
            return {
                n: Sketch(*doc["meta"][n], f.get_tensor(f"s{i}"))
                for i, n in enumerate(doc["names"])
            }
    except (KeyError, OSError, ValueError, TypeError, SafetensorError) as e:
        raise ValueError(f"{path} is not a sketch file: {e}") from None
