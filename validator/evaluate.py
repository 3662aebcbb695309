"""The validator's scoring of one round's deltas (the eval set and `Evaluator` are shared with
the merger and live in `protocol.moe.evaluate`).

One round, for one task::

    seed = eval_seed(block_hash_at_commit_deadline, round, task_id)
    eval_set = build_eval_set(tokenizer, "corpus:math", ["corpus:prose", "corpus:code"], seed,
                              seq_len=..., batch_size=..., domain_batches=...,
                              general_batches=..., max_tokens=...)
    evaluator = Evaluator(model, layout, eval_set)          # base losses measured once
    outcomes = evaluate_round(evaluator, {hotkey: path}, layout=layout, assignment=assignment,
                              max_bytes=max_delta_bytes(layout, assignment), ...,
                              entries=[Entry(hotkey, artifact_sha256, commit_block), ...],
                              general_tolerance=..., similarity_threshold=0.95,
                              function_threshold=0.9)

Why this shape:
- The batches come from the validator's private held-out text (`[validator] heldout`; without
  it the domain's public TEST split, which miners can train on) at positions drawn with a seed
  that only exists once commitments are closed, so a miner can neither train on them nor pick
  a delta that happens to suit them; validators with the same text and seed draw the same
  batches, and with their own texts they measure the same skill on different samples.
- The base is evaluated once per round and each delta is added into the one loaded model and
  reverted (bit-exactly) afterwards: no second model copy, no per-miner reload.
- The scoring rules themselves (paired LCB, general guard, duplicates) live in
  `protocol.round.scoring`; this module only feeds them measured numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protocol.artifact.delta import DeltaRejected
from protocol.artifact.fingerprint import BaseExperts, fingerprint
from protocol.artifact.sketch import Sketch, cosines, sketch
from protocol.artifact.untrusted import read_delta_untrusted
from protocol.round.drift import cumulative_guard
from protocol.round.scoring import (
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
from protocol.round.shards import shard_key
from validator.settings import FUNCTION_THRESHOLD

if TYPE_CHECKING:
    from protocol.moe.evaluate import Evaluator
    from protocol.moe.experts import Assignment
    from protocol.moe.model import ExpertLayout


def score_delta(
    evaluator: Evaluator,
    tensors: Mapping[str, torch.Tensor],
    *,
    general_tolerance: float,
    confidence: float = DEFAULT_CONFIDENCE,
    domain_name: str = "domain",
    min_improvement: float = 0.0,
    original_general: list[float] | None = None,
    cumulative_tolerance: float = math.inf,
) -> Score:
    """Evaluate one delta and score it by `protocol.round.scoring` (NaN/Inf losses -> INVALID).

    With `original_general` (the task's original base's general losses on the same batches,
    protocol.round.drift) the same general losses are also bounded against it, within
    `cumulative_tolerance`: no extra forward pass per delta."""
    domain, general = evaluator.evaluate(tensors)
    score = score_submission(
        paired_stats(evaluator.base_domain, domain, confidence=confidence),
        paired_stats(evaluator.base_general, general, confidence=confidence),
        general_tolerance=general_tolerance,
        domain_name=domain_name,
        min_improvement=min_improvement,
    )
    return cumulative_guard(
        score, original_general, general, tolerance=cumulative_tolerance, confidence=confidence
    )


# ----------------------------------------------------------------------------- similarity


def similarities(
    deltas: Mapping[str, Mapping[str, torch.Tensor]], *, secret: bytes = b""
) -> dict[tuple[str, str], float]:
    """Cosine similarity of every pair of deltas, keyed (a, b) with a < b, via
    `protocol.artifact.sketch` (exact when a delta has at most SKETCH_DIM elements, an estimate with
    ~0.004 standard error above).

    Only deltas over the same keys and shapes are compared; other pairs are absent, which
    `find_duplicates` reads as "not similar". A zero delta has no direction: its cosine with
    anything is 0.
    """
    return cosines({h: sketch(d, secret=secret) for h, d in deltas.items() if d})


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
    # The valid delta's sketch (protocol.artifact.sketch) and function fingerprint
    # (protocol.artifact.fingerprint), kept as a later round's copy-detection originals; None
    # for a rejected file.
    sketch: Sketch | None = field(default=None, compare=False, repr=False)
    fingerprint: Sketch | None = field(default=None, compare=False, repr=False)

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
    def copied(
        cls, hotkey: str, dup: Duplicate, sketch: Sketch | None = None, fp: Sketch | None = None
    ) -> Outcome:
        score = Score(0.0, DUPLICATE, dup.reason)
        return cls(hotkey, score, duplicate=dup, sketch=sketch, fingerprint=fp)


def _read_one(
    path: Path, entry: Entry, shards: Mapping[str, str] | None = None, **read_kwargs
) -> Mapping[str, torch.Tensor]:
    # The bytes must be the committed artifact: then equal digests mean equal bytes. Lazy: a
    # compressed delta is held as its wire tensors and decoded a projection at a time. With
    # `shards` (hotkey -> its shard key for the round), the delta must declare its committer's.
    shard = None if shards is None else shards[entry.hotkey]
    return read_delta_untrusted(
        path, expected_sha256=entry.digest, expected_shard=shard, lazy=True, **read_kwargs
    )[1]


def _sketch_all(
    submissions: Mapping[str, Path],
    entries: Mapping[str, Entry],
    secret: bytes,
    base: Mapping[str, torch.Tensor],
    shards: Mapping[str, str] | None = None,
    **read_kwargs,
) -> tuple[dict[str, Sketch], dict[str, Sketch], dict[str, Outcome]]:
    """Read every file untrusted, one at a time, keeping only its sketch and function
    fingerprint against `base`: (sketches and fingerprints of the valid ones, rejected
    outcomes). Memory stays one delta however many miners submit."""
    valid, prints, rejected = {}, {}, {}
    for hotkey in sorted(submissions):
        try:
            tensors = _read_one(submissions[hotkey], entries[hotkey], shards, **read_kwargs)
        except DeltaRejected as e:
            rejected[hotkey] = Outcome.rejected(hotkey, e)
            continue
        valid[hotkey] = sketch(tensors, secret=secret)
        prints[hotkey] = fingerprint(tensors, base, secret=secret)
        del tensors
    return valid, prints, rejected


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
    function_threshold: float = FUNCTION_THRESHOLD,
    confidence: float = DEFAULT_CONFIDENCE,
    domain_name: str = "domain",
    min_improvement: float = 0.0,
    history: Mapping[str, tuple[Entry, Sketch]] | None = None,
    history_fingerprints: Mapping[str, Sketch] | None = None,
    secret: bytes = b"",
    original_general: list[float] | None = None,
    cumulative_tolerance: float = math.inf,
    task_id: int | None = None,
) -> dict[str, Outcome]:
    """An Outcome per submitted hotkey: rejected, duplicate, or scored.

    `history` holds sketches of deltas accepted in earlier rounds (name -> (entry, sketch),
    drawn with the same `secret`), so a delta replayed from an earlier round, by anyone,
    relabelled or not, is a duplicate of it: the same work is paid once. Their entries' blocks
    are earlier than any of this round's. Each outcome of a valid file carries its sketch.

    Copies by function: each valid delta's fingerprint (protocol.artifact.fingerprint, on the
    evaluator's base with probes from `secret`) is compared with this round's and with
    `history_fingerprints` (same names as `history`; a name without one is compared by its
    sketch only); at `function_threshold` or above, the later commitment is a duplicate even
    when its neurons were permuted, sign-flipped or rescaled (raw cosine ~0).

    Every file is read twice (sketch, then score) so that only one delta is in memory at a
    time: at the Qwen3-30B-A3B shape a delta is ~7 GB and a round has many miners.

    `entries` give each submission's commitment (artifact sha256 as `digest`, commit block,
    tiebreak); every submission needs one. Duplicates are found among the valid deltas only
    (a rejected file cannot be anyone's original) and are not evaluated, so copies cost the
    validator no forward passes. A missing file raises (the caller's download is broken).
    `original_general` / `cumulative_tolerance`: the cumulative drift bound (score_delta).
    `task_id` (with `expected_round`): each delta must declare its committer's shard,
    protocol.round.shards.shard_key(task_id, hotkey, round), or it is rejected `wrong_shard`.
    """
    by_hotkey = {e.hotkey: e for e in entries}
    missing = sorted(set(submissions) - set(by_hotkey))
    if missing:
        raise ValueError(f"submissions without a commitment entry: {missing}")
    read_kwargs = dict(
        layout=layout,
        assignment=assignment,
        max_bytes=max_bytes,
        expected_base_hash=expected_base_hash,
        expected_round=expected_round,
    )
    shards = None
    if task_id is not None:
        if expected_round is None:
            raise ValueError("checking shards (task_id given) needs expected_round")
        shards = {h: shard_key(task_id, h, expected_round) for h in submissions}
    base = BaseExperts(evaluator.model, layout)  # the model is the base between evaluations
    valid, prints, outcomes = _sketch_all(
        submissions, by_hotkey, secret, base, shards, **read_kwargs
    )
    history = dict(history or {})
    clash = set(history) & set(valid)
    if clash:
        raise ValueError(f"history names collide with this round's hotkeys: {sorted(clash)}")
    entries_all = [by_hotkey[h] for h in valid] + [e for e, _ in history.values()]
    compared = {**valid, **{name: s for name, (_, s) in history.items()}}
    prints_all = {
        **prints,
        **{n: f for n, f in (history_fingerprints or {}).items() if n in history},
    }
    dups = find_duplicates(
        entries_all,
        cosines(compared),
        similarity_threshold,
        function_similarity=cosines(prints_all),
        function_threshold=function_threshold,
    )
    for hotkey, sk in valid.items():
        if hotkey in dups:
            outcomes[hotkey] = Outcome.copied(hotkey, dups[hotkey], sk, prints[hotkey])
            continue
        try:  # the same checks again: the file on disk could have changed since
            tensors = _read_one(submissions[hotkey], by_hotkey[hotkey], shards, **read_kwargs)
        except DeltaRejected as e:
            outcomes[hotkey] = Outcome.rejected(hotkey, e)
            continue
        score = score_delta(
            evaluator,
            tensors,
            general_tolerance=general_tolerance,
            confidence=confidence,
            domain_name=domain_name,
            min_improvement=min_improvement,
            original_general=original_general,
            cumulative_tolerance=cumulative_tolerance,
        )
        outcomes[hotkey] = Outcome(hotkey, score, sketch=sk, fingerprint=prints[hotkey])
    return dict(sorted(outcomes.items()))


__all__ = [
    "Outcome",
    "evaluate_round",
    "score_delta",
    "similarities",
]
