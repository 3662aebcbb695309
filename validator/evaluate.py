"""The validator's scoring of one round's deltas (the eval set and `Evaluator` are shared with
the merger and live in `protocol.evaluate`).

One round, for one task::

    seed = eval_seed(block_hash_at_commit_deadline, round, task_id)
    eval_set = build_eval_set(tokenizer, "corpus:math", ["corpus:prose", "corpus:code"], seed,
                              seq_len=..., batch_size=..., domain_batches=...,
                              general_batches=..., max_tokens=...)
    evaluator = Evaluator(model, layout, eval_set)          # base losses measured once
    outcomes = evaluate_round(evaluator, {hotkey: path}, layout=layout, assignment=assignment,
                              max_bytes=max_delta_bytes(layout, assignment), ...,
                              entries=[Entry(hotkey, artifact_sha256, commit_block), ...],
                              general_tolerance=..., similarity_threshold=0.95)

Why this shape:
- The batches come from the TEST split at positions drawn with a seed that only exists once
  commitments are closed, so a miner can neither train on them nor pick a delta that happens
  to suit them; every validator with the same seed draws the same batches, so honest
  validators agree on scores (consensus without talking to each other).
- The base is evaluated once per round and each delta is added into the one loaded model and
  reverted (bit-exactly) afterwards: no second model copy, no per-miner reload.
- The scoring rules themselves (paired LCB, general guard, duplicates) live in
  `protocol.scoring`; this module only feeds them measured numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protocol.delta import DeltaRejected, flatten
from protocol.delta_reader import read_delta_untrusted
from protocol.scoring import (
    DEFAULT_CONFIDENCE,
    DUPLICATE,
    INVALID,
    Duplicate,
    Entry,
    Score,
    find_duplicates,
    paired_stats,
    score_submission,
)

if TYPE_CHECKING:
    from protocol.evaluate import Evaluator
    from protocol.experts import Assignment
    from protocol.model import ExpertLayout


def score_delta(
    evaluator: Evaluator,
    tensors: Mapping[str, torch.Tensor],
    *,
    general_tolerance: float,
    confidence: float = DEFAULT_CONFIDENCE,
    domain_name: str = "domain",
    min_improvement: float = 0.0,
) -> Score:
    """Evaluate one delta and score it by `protocol.scoring` (NaN/Inf losses -> INVALID)."""
    domain, general = evaluator.evaluate(tensors)
    return score_submission(
        paired_stats(evaluator.base_domain, domain, confidence=confidence),
        paired_stats(evaluator.base_general, general, confidence=confidence),
        general_tolerance=general_tolerance,
        domain_name=domain_name,
        min_improvement=min_improvement,
    )


# ----------------------------------------------------------------------------- similarity


def similarities(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[tuple[str, str], float]:
    """Cosine similarity of every pair of flattened deltas, keyed (a, b) with a < b.

    Only deltas over the same keys and shapes are compared; other pairs are absent, which
    `find_duplicates` reads as "not similar". A zero delta has no direction: its cosine with
    anything is 0. One matrix product per key set instead of n^2 Python-level dot products.
    """
    groups: dict[tuple, list[str]] = {}
    for hotkey in sorted(deltas):
        d = deltas[hotkey]
        if d:
            shape = tuple((k, tuple(d[k].shape)) for k in sorted(d))
            groups.setdefault(shape, []).append(hotkey)
    out: dict[tuple[str, str], float] = {}
    for hotkeys in groups.values():
        if len(hotkeys) < 2:
            continue
        rows = torch.stack([flatten(dict(deltas[h])) for h in hotkeys])
        norms = rows.norm(dim=1, keepdim=True)
        rows.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))  # zero rows stay zero
        gram = (rows @ rows.T).clamp(-1.0, 1.0)
        for i, a in enumerate(hotkeys):
            for j in range(i + 1, len(hotkeys)):
                out[(a, hotkeys[j])] = float(gram[i, j])
    return out


# ----------------------------------------------------------------------------- one round


@dataclass(frozen=True)
class Outcome:
    """What happened to one submission this round.

    Exactly one of: `rejection` set (the file failed `read_delta_untrusted`; its `.code`),
    `duplicate` set (a copy of an earlier commitment: not evaluated, score 0), or a measured
    `score`. `score` is always present so `value`/`code` can be read uniformly.
    """

    hotkey: str
    score: Score
    rejection: str | None = None
    duplicate: Duplicate | None = None

    @property
    def value(self) -> float:
        return self.score.value

    @property
    def code(self) -> str:
        return self.score.code

    @property
    def reason(self) -> str:
        return self.score.reason

    @classmethod
    def rejected(cls, hotkey: str, error: DeltaRejected) -> Outcome:
        reason = f"delta rejected ({error.code}): {error.message}"
        return cls(hotkey, Score(0.0, INVALID, reason), rejection=error.code)

    @classmethod
    def copied(cls, hotkey: str, dup: Duplicate) -> Outcome:
        return cls(hotkey, Score(0.0, DUPLICATE, dup.reason), duplicate=dup)


def _read_all(
    submissions: Mapping[str, Path], entries: Mapping[str, Entry], **read_kwargs
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Outcome]]:
    """Load every file untrusted: (valid tensors by hotkey, rejected outcomes by hotkey)."""
    valid, rejected = {}, {}
    for hotkey in sorted(submissions):
        try:
            # The bytes must be the committed artifact: then equal digests mean equal bytes.
            _, tensors = read_delta_untrusted(
                submissions[hotkey], expected_sha256=entries[hotkey].digest, **read_kwargs
            )
        except DeltaRejected as e:
            rejected[hotkey] = Outcome.rejected(hotkey, e)
            continue
        valid[hotkey] = tensors
    return valid, rejected


def evaluate_round(
    evaluator: Evaluator,
    submissions: Mapping[str, Path],
    *,
    layout: ExpertLayout,
    assignment: Assignment,
    max_bytes: int,
    expected_base_hash: str | None,
    expected_round: int | None,
    entries: list[Entry],
    general_tolerance: float,
    similarity_threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
    domain_name: str = "domain",
    min_improvement: float = 0.0,
    history: Mapping[str, tuple[Entry, Mapping[str, torch.Tensor]]] | None = None,
) -> dict[str, Outcome]:
    """An Outcome per submitted hotkey: rejected, duplicate, or scored.

    `history` holds deltas accepted in earlier rounds (name -> (entry, tensors)), so a delta
    replayed from an earlier round, by anyone, relabelled or not, is a duplicate of it: the
    same work is paid once. Their entries' blocks are earlier than any of this round's.

    `entries` give each submission's commitment (artifact sha256 as `digest`, commit block,
    tiebreak); every submission needs one. Duplicates are found among the valid deltas only
    (a rejected file cannot be anyone's original) and are not evaluated, so copies cost the
    validator no forward passes. A missing file raises (the caller's download is broken).
    """
    by_hotkey = {e.hotkey: e for e in entries}
    missing = sorted(set(submissions) - set(by_hotkey))
    if missing:
        raise ValueError(f"submissions without a commitment entry: {missing}")
    valid, outcomes = _read_all(
        submissions,
        by_hotkey,
        layout=layout,
        assignment=assignment,
        max_bytes=max_bytes,
        expected_base_hash=expected_base_hash,
        expected_round=expected_round,
    )
    history = dict(history or {})
    clash = set(history) & set(valid)
    if clash:
        raise ValueError(f"history names collide with this round's hotkeys: {sorted(clash)}")
    entries_all = [by_hotkey[h] for h in valid] + [e for e, _ in history.values()]
    compared = {**valid, **{name: t for name, (_, t) in history.items()}}
    dups = find_duplicates(entries_all, similarities(compared), similarity_threshold)
    for hotkey, tensors in valid.items():
        if hotkey in dups:
            outcomes[hotkey] = Outcome.copied(hotkey, dups[hotkey])
            continue
        score = score_delta(
            evaluator,
            tensors,
            general_tolerance=general_tolerance,
            confidence=confidence,
            domain_name=domain_name,
            min_improvement=min_improvement,
        )
        outcomes[hotkey] = Outcome(hotkey, score)
    return dict(sorted(outcomes.items()))


__all__ = [
    "Outcome",
    "evaluate_round",
    "score_delta",
    "similarities",
]
