"""Cumulative general drift: a delta (or a merge) is also measured against the task's ORIGINAL
base, so regressions each within the per-round tolerance cannot add up without limit.

    original = original_general_losses(task_base, eval_set, cache_dir=state / "original_general")
    score = cumulative_guard(score, original, general, tolerance=0.15)   # validator, per delta
    rise = cumulative_rise(original, general)                            # merger's guard input

Why: the per-round guard compares base + delta with the round's base, and that base is the
previous round's merged checkpoint. A lineage of merges each allowed to lose up to the
per-round tolerance on general text drifts by that much every round, forever. The cumulative
bound compares the same general batches' losses of base + delta with those of the task's
original base (before any merged checkpoint), with the same one-sided upper confidence bound.

Cost: the original base's general losses are one forward pass over the round's general batches,
once per eval set (cached on disk by the eval set's digest, which covers its seed), not per
delta: the per-delta general losses the round already measures are reused. The original model
is loaded only while those losses are measured, then freed. Nothing is measured while a round
builds on the original base itself (the per-round guard is then the stricter one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from protocol.moe.evaluate import EvalSet, batch_losses
from protocol.moe.model import load_model
from protocol.ops.atomic import write_text_atomic
from protocol.round.scoring import (
    DEFAULT_CONFIDENCE,
    GENERAL_REGRESSION,
    Score,
    paired_stats,
)


def cumulative_rise(
    original: list[float], general: list[float], *, confidence: float = DEFAULT_CONFIDENCE
) -> float:
    """Upper confidence bound of the general-loss rise of `general` (base + delta, per batch)
    over `original` (the task's original base, the same batches); inf when not measurable."""
    stats = paired_stats(original, general, confidence=confidence)
    return -stats.lcb if stats.valid else math.inf


def cumulative_guard(
    score: Score,
    original: list[float] | None,
    general: list[float],
    *,
    tolerance: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Score:
    """`score`, zeroed as GENERAL_REGRESSION when the cumulative rise over the original base
    exceeds `tolerance`. A score already zero, or no original (the round builds on the
    original base), is returned unchanged."""
    if original is None or score.value <= 0:
        return score
    rise = cumulative_rise(original, general, confidence=confidence)
    if rise <= tolerance:
        return score
    reason = (
        f"cumulative general: loss rise over the task's original base, {confidence:.0%} upper "
        f"bound {rise:.4g} > cumulative tolerance {tolerance:.4g} (the round's own check passed: "
        f"{score.reason})"
    )
    return Score(0.0, GENERAL_REGRESSION, reason, score.domain_lcb, score.domain_mean,
                 score.general_mean)  # fmt: skip


def original_general_losses(
    task_base: str | Path, eval_set: EvalSet, *, cache_dir: str | Path, device: str = "cpu"
) -> list[float]:
    """Per-batch general losses of the task's original base on `eval_set.general`, measured
    once per eval set (cached as JSON under cache_dir, keyed by the eval set's digest)."""
    path = Path(cache_dir) / f"{eval_set.digest()}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if len(cached) == len(eval_set.general):
            return [float(x) for x in cached]
    model = load_model(task_base, device=device)
    try:
        losses = batch_losses(model, list(eval_set.general), device)
    finally:
        del model  # only this pass holds a second model
    if not all(math.isfinite(x) for x in losses):
        raise ValueError(f"the task base's general loss is non-finite: {losses}")
    write_text_atomic(path, json.dumps(losses))
    return losses


__all__ = ["cumulative_guard", "cumulative_rise", "original_general_losses"]
