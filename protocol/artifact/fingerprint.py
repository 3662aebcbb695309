"""Function fingerprints of expert deltas: copy detection that no neuron relabelling dodges.

A SwiGLU expert y = down @ (silu(gate @ x) * (up @ x)) computes the same function after
permuting its I hidden neurons (rows of gate/up with columns of down), flipping the sign of an
up row with the matching down column, or scaling an up row by c and the down column by 1/c. A
copier that applies these to `W_base + delta` and subtracts `W_base` ships a delta whose raw
cosine to the original is ~0 (permutation), ~0.4 (signs) or ~0.9 (scales) while it scores
exactly like the original. So a validator also compares what the deltas DO:

    for each assigned expert e (sorted), with probes X_e [n, H] drawn from the secret:
        out_e = f_{W_base,e + delta_e}(X_e) - f_{W_base,e}(X_e)             # [n, H]
    fingerprint = count sketch (protocol.artifact.sketch) of all out_e, flattened in order

Every symmetry above leaves out_e unchanged (exactly, up to the shipped dtype's rounding), so a
transformed copy has fingerprint cosine ~1 with its original, while two independently trained
deltas change the experts' outputs in different ways (docs/copies.md measures both).

Why secret Gaussian probes: the probes are the validator's own (drawn from its sketch secret,
never published), so a copier cannot add a perturbation that moves the fingerprint on exactly
the probes while keeping the function elsewhere. Standard-normal coordinates have the scale of
an RMSNorm output (rms 1), what an expert sees before the norm's learned weight. Real hidden
states were measured too (docs/copies.md): they make honest miners look MORE alike, because
both move the outputs on real text the same way, and they would tie the fingerprint to one
base, while Gaussian probes stay fixed across a lineage's bases.

Cost: two expert forwards on n probes per assigned expert, 4 n H I multiply-adds each; at the
Qwen3-30B-A3B shape and n = 64 that is ~0.1 GFLOP per expert, small against one evaluation
batch. Memory: one expert's three projections at a time plus the sketch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from protocol.artifact.delta import parse_expert_key
from protocol.artifact.sketch import SKETCH_DIM, Sketch, _signs, key_id
from protocol.artifact.wire import delta_shapes
from protocol.moe.model import ExpertLayout, expert_slices

if TYPE_CHECKING:
    from torch import nn

PROBES = 64  # probe inputs per expert: the fingerprint's view of each expert's function
_PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_forward(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One SwiGLU expert on inputs x [n, H]: down @ (silu(gate @ x) * (up @ x)) -> [n, H] (every
    supported family's routed experts, protocol.moe.model)."""
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def probes(secret: bytes, expert_prefix: str, n: int, hidden: int) -> torch.Tensor:
    """The secret probe inputs of one expert: [n, hidden] standard normal, float32, CPU."""
    digest = hashlib.sha256(secret + b"\0probe\0" + expert_prefix.encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(n, hidden, generator=g)


class BaseExperts(Mapping[str, torch.Tensor]):
    """A loaded model's expert weights under hub keys, as views resolved on access (no copy):
    the `base` a validator fingerprints against, while no delta is applied to the model."""

    def __init__(self, model: nn.Module, layout: ExpertLayout):
        self.model, self.layout = model, layout

    def __getitem__(self, key: str) -> torch.Tensor:
        parsed = parse_expert_key(key)
        if parsed is None or self.layout.expert_key(*parsed[1:]) != key:
            raise KeyError(key)
        _, layer, e, proj = parsed
        if layer not in self.layout.moe_layers or not 0 <= e < self.layout.num_experts:
            raise KeyError(key)
        return expert_slices(self.model, self.layout, layer, e)[proj]

    def __iter__(self) -> Iterator[str]:
        for layer in self.layout.moe_layers:
            for e in range(self.layout.num_experts):
                for proj in _PROJS:
                    yield self.layout.expert_key(layer, e, proj)

    def __len__(self) -> int:
        return len(self.layout.moe_layers) * self.layout.num_experts * len(_PROJS)


def _experts(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """expert prefix ("model.layers.3.mlp.experts.17") -> {proj: key}, every projection present."""
    out: dict[str, dict[str, str]] = {}
    for key in tensors:
        parsed = parse_expert_key(key)
        if parsed is None:
            raise ValueError(f"{key!r} is not an expert projection key")
        prefix, layer, e, proj = parsed
        out.setdefault(f"{prefix}.{layer}.mlp.experts.{e}", {})[proj] = key
    for name, projs in out.items():
        if set(projs) != set(_PROJS):
            raise ValueError(f"{name}: delta has {sorted(projs)}, a fingerprint needs all three")
    return dict(sorted(out.items()))


def fingerprint_signature(tensors: Mapping[str, torch.Tensor], n: int) -> str:
    """Which fingerprints are comparable: same experts, shapes and probe count. Never equal to
    a raw sketch's signature, so the two kinds are never compared with each other."""
    known = delta_shapes(tensors)
    shapes = [[k, list(known[k])] for k in sorted(known)]
    body = json.dumps({"function": n, "shapes": shapes}, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@torch.no_grad()
def equivalent_delta(
    tensors: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    *,
    permute: bool = True,
    flip: bool = True,
    rescale: bool = True,
) -> dict[str, torch.Tensor]:
    """A delta whose experts compute exactly what `tensors`' do, written differently: per
    expert a random neuron permutation, random up/down sign flips and random up/down scales in
    [0.5, 2] applied to `base + tensors`, minus `base` (float32 CPU). The copier's disguise
    (miner.strategies.copier); the tests' and docs/copies.md's attack."""
    out = {}
    for keys in _experts(tensors).values():
        w = {p: base[k].float().cpu() + tensors[k].float().cpu() for p, k in keys.items()}
        inner = w["gate_proj"].shape[0]
        perm = torch.randperm(inner, generator=generator) if permute else torch.arange(inner)
        factor = torch.ones(inner)
        if flip:
            factor = factor * (torch.randint(0, 2, (inner,), generator=generator) * 2 - 1)
        if rescale:
            factor = factor * 2.0 ** (torch.rand(inner, generator=generator) * 2 - 1)
        new = {
            "gate_proj": w["gate_proj"][perm],
            "up_proj": (w["up_proj"] * factor[:, None])[perm],
            "down_proj": (w["down_proj"] / factor[None, :])[:, perm],
        }
        for p, k in keys.items():
            out[k] = new[p] - base[k].float().cpu()
    return out


@torch.no_grad()
def fingerprint(
    tensors: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    secret: bytes,
    n: int = PROBES,
    dim: int = SKETCH_DIM,
) -> Sketch:
    """The function fingerprint of a delta (module docstring) as a Sketch, comparable with
    `protocol.artifact.sketch.cosines` to fingerprints of the same experts under the same secret.

    `tensors`: the delta (hub keys; a WireDelta decodes one projection at a time). `base`: the
    base weights under the same keys (a model's views, `protocol.moe.model.expert_slices`); the
    computation runs on the base's device in float32.
    """
    if not tensors:
        raise ValueError("cannot fingerprint an empty delta")
    if n <= 0 or dim <= 0:
        raise ValueError(f"probe count and sketch dim must be positive, got {n}, {dim}")
    experts = _experts(tensors)
    total = sum(n * math.prod(delta_shapes(tensors)[p["down_proj"]][:1]) for p in experts.values())
    size = min(total, dim)
    vec = torch.zeros(size, dtype=torch.float64)
    offset = 0
    for name, keys in experts.items():
        w0 = {p: base[k].float() for p, k in keys.items()}
        device = w0["gate_proj"].device
        w1 = {p: w0[p] + tensors[k].to(device, torch.float32) for p, k in keys.items()}
        x = probes(secret, name, n, w0["gate_proj"].shape[1]).to(device)
        out = expert_forward(*(w1[p] for p in _PROJS), x) - expert_forward(
            *(w0[p] for p in _PROJS), x
        )
        flat = out.reshape(-1).to("cpu", torch.float64)
        m = flat.numel()
        signed = flat * _signs(secret, "function:" + name, m).double()
        vec.index_add_(0, torch.arange(offset, offset + m).remainder_(size), signed)
        offset += m
        del w0, w1, out
    out = vec.float()
    if not bool(torch.isfinite(out).all()):
        # Outputs past float32's range: no direction, so neither anyone's copy nor anyone's
        # original (a NaN cosine would stop the duplicate rule); scoring still measures it.
        out.zero_()
    return Sketch(fingerprint_signature(tensors, n), key_id(secret), out)
