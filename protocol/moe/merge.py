"""Merging expert deltas: pure tensor functions over delta dicts.

A delta maps hub per-expert keys (`ExpertLayout.expert_key`) to `trained - base` tensors of the
assigned experts only. Deltas of the SAME experts from several contributors are combined with
`weighted_average` (or `streamed_average`, the same over deltas read one at a time), `ties` or
`dare`, or stepped through the DiLoCo outer optimizer (`DiLoCoOuter`, algorithms.md section 2);
deltas of DISJOINT expert sets (domains trained independently, Branch-Train-MiX style) are
combined with `compose` (section 3).

Every function returns new float32 tensors and never modifies its inputs. Tests:
`python -m pytest -q tests/unit/test_merge.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from protocol.ops.atomic import write_bytes_atomic

Delta = dict[str, torch.Tensor]  # hub per-expert key -> (trained - base)

OUTER_STATE_FORMAT = "moesaic-outer-state"
OUTER_STATE_VERSION = 1
METADATA_KEY = "moesaic"


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Non-negative finite weights scaled to sum 1; None means equal weights."""
    if n == 0:
        raise ValueError("nothing to merge: no deltas given")
    if weights is None:
        return [1.0 / n] * n
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise ValueError(f"got {len(ws)} weights for {n} deltas: give exactly one weight per delta")
    bad = [w for w in ws if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"weights must be finite and >= 0, got {bad}")
    total = sum(ws)
    if total <= 0:
        raise ValueError("all weights are zero: at least one delta needs a positive weight")
    return [w / total for w in ws]


def _check_like(i: int, d: Delta, first: Delta) -> None:
    """Delta i must cover the same keys with the same shapes as delta 0."""
    if d.keys() != first.keys():
        only_i = sorted(set(d) - set(first))[:3]
        only_0 = sorted(set(first) - set(d))[:3]
        raise ValueError(
            f"delta {i} covers different experts than delta 0 (only in {i}: {only_i}, only "
            f"in 0: {only_0}); merging needs deltas of the same assignment (use compose for "
            "disjoint expert sets)"
        )
    for k, t in d.items():
        if t.shape != first[k].shape:
            raise ValueError(
                f"{k}: delta {i} has shape {tuple(t.shape)}, delta 0 {tuple(first[k].shape)}"
            )


def _common_keys(deltas: Sequence[Delta]) -> list[str]:
    """Sorted keys shared by every delta; refuses differing key sets or shapes."""
    if not deltas:
        raise ValueError("nothing to merge: no deltas given")
    for i, d in enumerate(deltas[1:], start=1):
        _check_like(i, d, deltas[0])
    return sorted(deltas[0])


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_c w_c * t_c accumulated in float32 (zero-weight terms skipped)."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for w, t in zip(weights, tensors, strict=True):
        if w:
            acc.add_(t.to(torch.float32), alpha=w)
    return acc


def weighted_average(deltas: Sequence[Delta], weights: Sequence[float] | None = None) -> Delta:
    """theta0 + sum_c w_c tau_c with sum w_c = 1: per key sum of w_c * tau_c in float32."""
    ws = normalise_weights(weights, len(deltas))
    return {k: _weighted_sum([d[k] for d in deltas], ws) for k in _common_keys(deltas)}


def streamed_average(deltas: Iterable[Delta], weights: Sequence[float]) -> Delta:
    """`weighted_average` of deltas produced one at a time, e.g. read from disk by a generator.

    Only the float32 sum and the delta being added are alive, so merging K deltas of a large
    model needs one delta's memory, not K. Bit-identical to weighted_average(list(deltas),
    weights): per key the same float32 additions in the same order.
    """
    ws = normalise_weights(weights, len(weights))
    acc: Delta = {}
    first: Delta = {}
    i = 0
    for d in deltas:  # not enumerate: its cached result tuple would keep the last delta alive
        if i >= len(ws):
            raise ValueError(f"got more deltas than the {len(ws)} weights")
        if i == 0:
            first = {k: torch.empty(t.shape, device="meta") for k, t in d.items()}
            acc = {k: torch.zeros(d[k].shape, dtype=torch.float32, device=d[k].device)
                   for k in sorted(d)}  # fmt: skip
        _check_like(i, d, first)
        if ws[i]:
            for k, a in acc.items():
                a.add_(d[k].to(torch.float32), alpha=ws[i])
        del d  # before the next one is read
        i += 1
    if i != len(ws):
        raise ValueError(f"got {i} deltas for {len(ws)} weights: give exactly one per delta")
    return acc


def contributor_scale(weights: Sequence[float], cap: float) -> float:
    """sqrt(N_eff), at most `cap`, where N_eff = 1 / sum(w^2) of the normalised weights (N for N
    equal weights, 1 for a single contributor): the step the "scaled" merge takes along the
    weighted average.

    Why: each miner's delta is signal (what its shard teaches about the domain, common to all)
    plus noise (its own shard's and seed's). Averaging N deltas keeps the signal and divides
    the noise's norm by sqrt(N), so the average is a SHORTER step than any one delta: N miners
    averaged gain about what one gains (docs/network.md). Scaling the average by sqrt(N_eff)
    restores one delta's noise while multiplying the signal by sqrt(N_eff), which a lone miner
    cannot do by raising its learning rate (that scales its noise too). Copies cannot inflate
    N_eff: validators pay one of each duplicate only, and the merger merges paid deltas only.
    """
    if not (math.isfinite(cap) and cap >= 1):
        raise ValueError(f"the scale cap must be a number >= 1, got {cap}")
    ws = normalise_weights(weights, len(weights))
    return min(cap, math.sqrt(1.0 / sum(w * w for w in ws)))


def scaled(delta: Delta, factor: float) -> Delta:
    """factor * delta, in float32 (a new dict; the input is not modified)."""
    if not math.isfinite(factor):
        raise ValueError(f"scale factor must be finite, got {factor}")
    return {k: t.to(torch.float32) * factor for k, t in delta.items()}


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` fraction of entries by magnitude (ties at the cut all kept)."""
    n = t.numel()
    k = min(n, max(1, math.ceil(density * n)))
    if k >= n:
        return t
    mag = t.abs()
    threshold = torch.topk(mag.flatten(), k).values[-1]
    return torch.where((mag >= threshold) & (mag > 0), t, torch.zeros_like(t))


def ties(
    deltas: Sequence[Delta], weights: Sequence[float] | None = None, density: float = 0.2
) -> Delta:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

    Per tensor, each tau keeps its top-`density` magnitudes; the sign of each coordinate is the
    sign of the (weighted) sum of trimmed values; the result is the weighted mean of the trimmed
    entries that agree with that sign (0 where none does). Equal weights give the paper's
    disjoint mean; the paper's final scale lambda is 1 here.
    """
    if not 0 < density <= 1:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    ws = normalise_weights(weights, len(deltas))
    out = {}
    for k in _common_keys(deltas):
        trimmed = torch.stack([_trim(d[k].to(torch.float32), density) for d in deltas])
        w = torch.tensor(ws, dtype=torch.float32, device=trimmed.device)
        w = w.view(-1, *([1] * (trimmed.dim() - 1)))
        elected = torch.sign((w * trimmed).sum(0))
        agree_w = w * ((torch.sign(trimmed) == elected) & (trimmed != 0))
        denom = agree_w.sum(0)
        mean = (agree_w * trimmed).sum(0) / denom.clamp_min(torch.finfo(torch.float32).tiny)
        out[k] = torch.where(denom > 0, mean, torch.zeros_like(mean))
    return out


def _dare_seed(seed: int, contributor: int, key: str) -> int:
    """Independent per-(contributor, key) stream: the mask does not depend on dict order."""
    digest = hashlib.sha256(f"{seed}:{contributor}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(
    deltas: Sequence[Delta],
    weights: Sequence[float] | None = None,
    drop: float = 0.9,
    seed: int = 0,
) -> Delta:
    """DARE (Yu et al. 2023): drop each entry with prob `drop`, rescale by 1/(1-drop), average.

    Deterministic for a seed: each (contributor, key) mask comes from its own CPU generator.
    The expectation of the result equals the weighted average.
    """
    if not 0 <= drop < 1:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {drop}")
    ws = normalise_weights(weights, len(deltas))
    scale = 1.0 / (1.0 - drop)
    out = {}
    for k in _common_keys(deltas):
        kept = []
        for c, d in enumerate(deltas):
            gen = torch.Generator(device="cpu").manual_seed(_dare_seed(seed, c, k))
            keep = (torch.rand(d[k].shape, generator=gen) >= drop).to(d[k].device)
            t = d[k].to(torch.float32)
            kept.append(torch.where(keep, t * scale, torch.zeros_like(t)))
        out[k] = _weighted_sum(kept, ws)
    return out


def compose(deltas_by_task: Sequence[Delta], overlap: str = "error") -> Delta:
    """Union of deltas of disjoint expert sets (one per task/domain) over one base.

    Exact when no key repeats. Keys present in several tasks raise ValueError naming them,
    unless `overlap="average"`, which takes the equal-weight mean of the tasks that have them.
    """
    if overlap not in ("error", "average"):
        raise ValueError(f"overlap must be 'error' or 'average', got {overlap!r}")
    if not deltas_by_task:
        raise ValueError("nothing to compose: no task deltas given")
    counts = Counter(k for d in deltas_by_task for k in d)
    shared = sorted(k for k, n in counts.items() if n > 1)
    if shared and overlap == "error":
        shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        raise ValueError(
            f"{len(shared)} expert tensors are in more than one task delta ({shown}); use "
            "disjoint assignments, or pass overlap='average' (CLI: --overlap average)"
        )
    out = {}
    for k in sorted(counts):
        parts = [d[k] for d in deltas_by_task if k in d]
        if any(p.shape != parts[0].shape for p in parts):
            raise ValueError(
                f"{k}: task deltas disagree on shape {[tuple(p.shape) for p in parts]}"
            )
        out[k] = _weighted_sum(parts, [1.0 / len(parts)] * len(parts))
    return out


@dataclass
class DiLoCoOuter:
    """DiLoCo outer optimizer: SGD with (Nesterov) momentum over pseudo-gradients.

    Deltas are `trained - base`, so the pseudo-gradient is g = -avg_delta. Each `step` does
    m = momentum * m + g and returns update = -lr * (g + momentum * m) (Nesterov) or -lr * m,
    the delta to add to the global weights. lr=1, momentum=0 returns avg_delta exactly. Keys
    absent from a step keep their buffer untouched and get no update.
    """

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    steps: int = 0
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"outer lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")

    def step(self, avg_delta: Delta) -> Delta:
        """One outer step on the (weighted) average delta; returns the update delta."""
        for k, d in avg_delta.items():
            m = self.buffers.get(k)
            if m is not None and m.shape != d.shape:
                raise ValueError(
                    f"{k}: delta shape {tuple(d.shape)} != momentum buffer {tuple(m.shape)}"
                    " (outer state from a different model?)"
                )
        update = {}
        for k, d in sorted(avg_delta.items()):
            g = -d.to(torch.float32)
            m = self.buffers.get(k)
            m = g.clone() if m is None else m.to(g.device).mul(self.momentum).add_(g)
            self.buffers[k] = m
            direction = g + self.momentum * m if self.nesterov else m.clone()
            update[k] = direction.mul_(-self.lr)
        self.steps += 1
        return update

    def meta(self) -> dict:
        return {
            "format": OUTER_STATE_FORMAT,
            "format_version": OUTER_STATE_VERSION,
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "steps": self.steps,
        }

    def state_dict(self) -> dict:
        return {**self.meta(), "buffers": dict(self.buffers)}

    def save(self, path: str | Path) -> None:
        """Write the buffers as safetensors with the hyperparameters under metadata "moesaic"."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.buffers.items()}
        blob = save(tensors, metadata={METADATA_KEY: json.dumps(self.meta(), sort_keys=True)})
        write_bytes_atomic(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> DiLoCoOuter:
        meta, buffers = read_versioned(path, "outer state", OUTER_STATE_FORMAT, OUTER_STATE_VERSION)
        return cls(
            lr=float(meta["lr"]),
            momentum=float(meta["momentum"]),
            nesterov=bool(meta["nesterov"]),
            steps=int(meta["steps"]),
            buffers=buffers,
        )


def read_versioned(
    path: str | Path, what: str, fmt: str, version: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose metadata "moesaic" entry is JSON naming
    `fmt` and `version` (the DiLoCo outer state here, the checkpoint's merge state in
    protocol.artifact.merge_state); ValueError naming the file and `what` otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors {what} ({e})") from e
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} metadata is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file")
    if meta.get("format_version") != version:
        raise ValueError(
            f"{path}: {what} version {meta.get('format_version')} unsupported (want {version})"
        )
    return meta, tensors
