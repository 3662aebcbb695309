"""Expert selection (ESFT, Wang et al. 2024) and the versioned expert assignment.

The selection itself is pure: per-layer relevance scores in, expert ids out. Routing statistics
are collected by `protocol.moe.routing` with forward hooks on the routers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protocol.identity.hashing import sha256_json
from protocol.ops.atomic import write_text_atomic

ASSIGNMENT_VERSION = 1
METHODS = ("token-ratio", "gate-score", "random", "all")


def token_ratio(counts: list[float], tokens: int, top_k: int) -> list[float]:
    """ESFT token ratio r_i = (#tokens routed to i) / (T * K); sums to 1 over a layer."""
    if tokens <= 0 or top_k <= 0:
        raise ValueError("token ratio needs a positive token count and top-k")
    return [c / (tokens * top_k) for c in counts]


def gate_score(weight_sums: list[float], tokens: int) -> list[float]:
    """ESFT gate score g_i = mean over tokens of the routing weight of i (0 if not chosen)."""
    if tokens <= 0:
        raise ValueError("gate score needs a positive token count")
    return [w / tokens for w in weight_sums]


def select_by_threshold(scores: list[float], p: float) -> list[int]:
    """Smallest set of experts whose cumulative score reaches p, per the ESFT paper.

    Scores are normalised within the layer (the paper's formula; the reference code normalises
    across layers), sorted descending with ties broken by expert id, and the expert that
    crosses p is included. Returns sorted expert ids.
    """
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    total = sum(scores)
    if total <= 0:
        raise ValueError("all relevance scores are zero: no tokens reached this layer")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen, cum = [], 0.0
    for i in order:
        chosen.append(i)
        cum += scores[i] / total
        if cum >= p - 1e-12:
            break
    return sorted(chosen)


@dataclass(frozen=True)
class Assignment:
    """Which experts of which layers a task trains. Its hash is what deltas and the chain cite."""

    layers: dict[int, tuple[int, ...]]
    method: str
    p: float | None
    model_hash: str
    num_experts: int
    version: int = ASSIGNMENT_VERSION
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.version != ASSIGNMENT_VERSION:
            raise ValueError(
                f"assignment version {self.version} unsupported (want {ASSIGNMENT_VERSION})"
            )
        if self.method not in METHODS:
            raise ValueError(f"unknown selection method {self.method!r}; one of {METHODS}")
        if not self.layers:
            raise ValueError("assignment selects no layers")
        for layer, experts in self.layers.items():
            if not experts:
                raise ValueError(f"layer {layer} selects no experts")
            if list(experts) != sorted(set(experts)):
                raise ValueError(f"layer {layer}: expert ids must be sorted and unique")
            if experts[0] < 0 or experts[-1] >= self.num_experts:
                raise ValueError(f"layer {layer}: expert id outside [0, {self.num_experts})")

    def body(self) -> dict:
        """The hashed content (info, like timings and tables, is not part of the identity)."""
        return {
            "version": self.version,
            "method": self.method,
            "p": self.p,
            "model_hash": self.model_hash,
            "num_experts": self.num_experts,
            "layers": {str(k): list(v) for k, v in sorted(self.layers.items())},
        }

    def hash(self) -> str:
        return sha256_json(self.body())

    def num_selected(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def pairs(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs in canonical order."""
        return [(layer, e) for layer in sorted(self.layers) for e in self.layers[layer]]

    def to_json(self) -> dict:
        return {**self.body(), "hash": self.hash(), "info": self.info}

    @classmethod
    def from_json(cls, data: dict) -> Assignment:
        try:
            a = cls(
                layers={int(k): tuple(int(e) for e in v) for k, v in data["layers"].items()},
                method=data["method"],
                p=data["p"],
                model_hash=data["model_hash"],
                num_experts=int(data["num_experts"]),
                version=int(data["version"]),
                info=data.get("info", {}),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed assignment: {e!r}") from e
        if "hash" in data and data["hash"] != a.hash():
            raise ValueError(
                f"assignment hash mismatch: file says {data['hash']}, content is {a.hash()}"
            )
        return a

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Assignment:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
        return cls.from_json(data)


def select(
    scores_by_layer: dict[int, list[float]],
    p: float,
    method: str,
    model_hash: str,
    num_experts: int,
    exclude: Sequence[Assignment] = (),
) -> Assignment:
    """Apply the cumulative threshold to every layer's scores.

    `exclude`: other tasks' assignments whose experts this task must not take, so that tasks
    can be merged into one checkpoint by composition (protocol.moe.merge.compose needs disjoint
    expert sets). Their scores count as zero and the threshold applies to what remains: the
    task gets the best experts still free, covering share p of the free experts' relevance.
    """
    taken: dict[int, set[int]] = {}
    for other in exclude:
        if other.model_hash != model_hash:
            raise ValueError(f"excluded assignment is for base {other.model_hash[:16]}")
        for layer, experts in other.layers.items():
            taken.setdefault(layer, set()).update(experts)
    layers = {}
    for layer, scores in sorted(scores_by_layer.items()):
        free = [0.0 if e in taken.get(layer, ()) else s for e, s in enumerate(scores)]
        if sum(free) <= 0:
            raise ValueError(f"layer {layer}: every expert with traffic is taken by another task")
        layers[layer] = tuple(select_by_threshold(free, p))
    return Assignment(layers, method, p, model_hash, num_experts)


def random_like(a: Assignment, seed: int) -> Assignment:
    """Random experts with the same count per layer: the ESFT paper's control."""
    rng = random.Random(seed)
    layers = {
        layer: tuple(sorted(rng.sample(range(a.num_experts), len(ex))))
        for layer, ex in a.layers.items()
    }
    return Assignment(layers, "random", None, a.model_hash, a.num_experts, info={"seed": seed})
