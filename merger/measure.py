"""How the merger reads and measures candidates: fetched deltas read untrusted (`Reader`) and
base + delta measured on an eval set and scored by the validators' rule (`measure`).

Effectful (it runs the model through protocol.moe.evaluate.Evaluator); the decisions on the
numbers are merger/core.py's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.artifact.delta import DeltaRejected
from protocol.artifact.untrusted import read_delta_untrusted
from protocol.round.drift import cumulative_guard, cumulative_rise
from protocol.round.scoring import paired_stats, score_submission
from protocol.round.shards import shard_key


@dataclass(frozen=True)
class Reader:
    """Fetched deltas read from state_dir with read_delta_untrusted, as validators read them.

    Calling the reader with a hotkey returns the delta (`lazy`: a compressed one kept as its
    wire tensors, protocol.artifact.wire.WireDelta); `check(hotkey)` says why it is refused ("" if
    readable) and keeps nothing. Every read checks the recorded sha256 again, and that the
    delta declares its committer's shard of (task_id, round), as validators check.
    """

    state_dir: Path
    fetched: dict
    checks: dict
    task_id: int
    round: int

    def __call__(self, hotkey: str, lazy: bool = False) -> Mapping:
        f = self.fetched[hotkey]
        path, sha = self.state_dir / f["path"], f["artifact_sha256"]
        shard = shard_key(self.task_id, hotkey, self.round)
        return read_delta_untrusted(
            path, expected_sha256=sha, expected_shard=shard, lazy=lazy, **self.checks
        )[1]

    def check(self, hotkey: str) -> str:
        try:
            self(hotkey, lazy=True)  # every check runs; nothing decoded is kept
        except DeltaRejected as e:
            return f"{e.code}: {e.message}"
        return ""


def measure(evaluator, delta, *, settings, original: list[float] | None, domain_name: str) -> dict:
    """base + delta on the evaluator's batches, as a JSON-able record.

    domain_mean and general_mean (mean loss per batch), general_rise (upper bound of the general
    loss rise over the round's base), domain_gain and domain_lcb (the paired domain improvement
    and its lower bound), score_code and score_reason (the validators' rule,
    protocol.round.scoring with `settings.min_improvement`, then protocol.round.drift's
    cumulative check); with `original` (the task's original base's general losses on the same
    batches) also cumulative_rise. `settings`: MergerSettings.
    """
    domain, general = evaluator.evaluate(delta)
    e = settings.evaluation
    d = paired_stats(evaluator.base_domain, domain, confidence=e.confidence)
    g = paired_stats(evaluator.base_general, general, confidence=e.confidence)
    score = score_submission(
        d, g, general_tolerance=e.general_tolerance, domain_name=domain_name,
        min_improvement=settings.min_improvement,
    )  # fmt: skip
    score = cumulative_guard(
        score, original, general, tolerance=settings.cumulative_general_tolerance,
        confidence=e.confidence,
    )  # fmt: skip
    measured = {"domain_mean": mean(domain), "general_mean": mean(general)}
    measured["general_rise"] = -g.lcb if g.valid else math.inf
    measured.update(domain_gain=_finite(d.mean), domain_lcb=_finite(d.lcb))
    measured.update(score_code=score.code, score_reason=score.reason)
    if original is not None:
        measured["cumulative_rise"] = cumulative_rise(original, general, confidence=e.confidence)
    return measured


def mean(xs: Sequence[float]) -> float:
    """fsum mean; a non-finite one is inf (worse than any loss)."""
    m = math.fsum(xs) / len(xs)
    return m if math.isfinite(m) else math.inf


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
