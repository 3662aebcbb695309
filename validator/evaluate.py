"""The validator's evaluation engine: seeded held-out batches, in-place delta evaluation, scores.

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

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protocol.data import load_blocks, sample_batches
from protocol.delta import DeltaRejected, apply_delta, flatten
from protocol.delta_reader import read_delta_untrusted
from protocol.evaluate import batch_losses
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
    from torch import nn

    from protocol.experts import Assignment
    from protocol.model import ExpertLayout

SEED_DOMAIN = "moesaic-eval-seed-v1"  # versioned so a future derivation cannot collide
_HEX = re.compile(r"^[0-9a-f]+$")

# ----------------------------------------------------------------------------- seed


def eval_seed(block_hash: str, round: int, task_id: int) -> int:
    """63-bit evaluation seed: sha256 of the commit-deadline block hash, round and task.

    The block hash is normalised (optional 0x, any case) so EVM and substrate spellings of the
    same hash agree. 63 bits keep the seed a non-negative int64 (torch.Generator accepts it).
    """
    h = block_hash.lower().removeprefix("0x") if isinstance(block_hash, str) else ""
    if not _HEX.match(h):
        raise ValueError(f"block hash {block_hash!r} is not a hex string")
    for name, value in (("round", round), ("task_id", task_id)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    digest = hashlib.sha256(f"{SEED_DOMAIN}|{h}|{round}|{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----------------------------------------------------------------------------- eval set


@dataclass(frozen=True)
class EvalSet:
    """The round's held-out batches ([batch_size, seq_len] token ids each), domain and general."""

    seed: int
    domain: tuple[torch.Tensor, ...]
    general: tuple[torch.Tensor, ...]

    def digest(self) -> str:
        """sha256 over the seed and every token: validators can compare eval sets by one hex."""
        h = hashlib.sha256(f"{self.seed}".encode())
        for name, batches in (("domain", self.domain), ("general", self.general)):
            h.update(f"|{name}:{len(batches)}".encode())
            for b in batches:
                h.update(f"|{tuple(b.shape)}".encode())
                h.update(b.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def _draw(blocks: torch.Tensor, batch_size: int, num_batches: int, seed: int, what: str):
    # The paired t bound treats batches as independent samples: a block reused across batches
    # would count twice and overstate the confidence, so refuse rather than wrap around.
    if num_batches < 2:
        raise ValueError(f"{what}: need >= 2 batches for a confidence bound, got {num_batches}")
    need = batch_size * num_batches
    if need > len(blocks):
        raise ValueError(
            f"{what}: {num_batches} batches of {batch_size} need {need} distinct blocks, the "
            f"test split gave {len(blocks)}; raise max_tokens or lower the batch count"
        )
    return tuple(sample_batches(blocks, batch_size, num_batches, seed=seed))


def build_eval_set(
    tokenizer,
    domain_spec: str,
    general_specs: list[str],
    seed: int,
    *,
    seq_len: int,
    batch_size: int,
    domain_batches: int,
    general_batches: int,
    max_tokens: int,
) -> EvalSet:
    """Seeded batches from the TEST split of the domain and of the general specs.

    General blocks are the concatenation of each general spec's test blocks (each capped at
    `max_tokens`), so every general batch mixes the general sources. Same inputs and seed ->
    identical batches on every machine (`EvalSet.digest`).
    """
    if not general_specs:
        raise ValueError("at least one general data spec is needed for the forgetting guard")
    domain = load_blocks(domain_spec, "test", tokenizer, seq_len, max_tokens)
    general = torch.cat(
        [load_blocks(s, "test", tokenizer, seq_len, max_tokens) for s in general_specs]
    )
    return EvalSet(
        seed=seed,
        domain=_draw(domain, batch_size, domain_batches, seed, f"domain {domain_spec}"),
        general=_draw(general, batch_size, general_batches, seed, "general"),
    )


# ----------------------------------------------------------------------------- evaluator


class Evaluator:
    """Per-batch losses of the base (measured once) and of the base plus one delta at a time.

    The model is modified in place while a delta is evaluated and restored bit-exactly after,
    even when the evaluation raises (`apply_delta` checks every key before writing anything).
    """

    def __init__(
        self, model: nn.Module, layout: ExpertLayout, eval_set: EvalSet, device: str = "cpu"
    ):
        self.model = model
        self.layout = layout
        self.eval_set = eval_set
        self.device = device
        self.base_domain = self._losses(eval_set.domain)
        self.base_general = self._losses(eval_set.general)
        for name, losses in (("domain", self.base_domain), ("general", self.base_general)):
            if not all(math.isfinite(x) for x in losses):
                # The validator's own setup is broken; no miner should be scored against it.
                raise ValueError(f"base {name} loss is non-finite: {losses}")

    def _losses(self, batches: tuple[torch.Tensor, ...]) -> list[float]:
        return batch_losses(self.model, list(batches), self.device)

    def evaluate(self, tensors: Mapping[str, torch.Tensor]) -> tuple[list[float], list[float]]:
        """(domain losses, general losses) per batch with the delta added; the model is reverted."""
        applied = apply_delta(self.model, self.layout, dict(tensors))
        try:
            return self._losses(self.eval_set.domain), self._losses(self.eval_set.general)
        finally:
            applied.revert()


def score_delta(
    evaluator: Evaluator,
    tensors: Mapping[str, torch.Tensor],
    *,
    general_tolerance: float,
    confidence: float = DEFAULT_CONFIDENCE,
    domain_name: str = "domain",
) -> Score:
    """Evaluate one delta and score it by `protocol.scoring` (NaN/Inf losses -> INVALID)."""
    domain, general = evaluator.evaluate(tensors)
    return score_submission(
        paired_stats(evaluator.base_domain, domain, confidence=confidence),
        paired_stats(evaluator.base_general, general, confidence=confidence),
        general_tolerance=general_tolerance,
        domain_name=domain_name,
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
) -> dict[str, Outcome]:
    """An Outcome per submitted hotkey: rejected, duplicate, or scored.

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
    dups = find_duplicates([by_hotkey[h] for h in valid], similarities(valid), similarity_threshold)
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
        )
        outcomes[hotkey] = Outcome(hotkey, score)
    return dict(sorted(outcomes.items()))


__all__ = [
    "EvalSet",
    "Evaluator",
    "Outcome",
    "build_eval_set",
    "eval_seed",
    "evaluate_round",
    "score_delta",
    "similarities",
]
