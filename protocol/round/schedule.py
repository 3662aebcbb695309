"""The round schedule: a pure function of the block number, identical in Python and Solidity.

A round is a fixed sequence of phases of given lengths in blocks, starting at `start_block`:
train -> commit -> reveal -> evaluate -> weights -> merge, then the next round. No coordinator
service: every role (and the registry contract) derives the same phase from the same block.
The eval seed is the hash of the block at the commit deadline (the last block of the commit
phase), unknown to miners while they train.
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("train", "commit", "reveal", "evaluate", "weights", "merge")


class WrongPhase(ValueError):
    """A step was asked for at a block where the schedule does not allow it."""


@dataclass(frozen=True)
class Schedule:
    start_block: int = 0
    train: int = 20
    commit: int = 5
    reveal: int = 5
    evaluate: int = 10
    weights: int = 5
    merge: int = 5

    def __post_init__(self):
        if self.start_block < 0:
            raise ValueError("start_block must be >= 0")
        for name in PHASES:
            if getattr(self, name) <= 0:
                raise ValueError(f"phase {name!r} must last at least one block")

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in PHASES)

    @property
    def round_length(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class Position:
    """Where a block falls: round number, phase, and the phase's first and last block."""

    round: int
    phase: str
    phase_start: int
    phase_end: int  # inclusive


def position(s: Schedule, block: int) -> Position | None:
    """The round and phase of `block`, or None before the first round starts."""
    if block < s.start_block:
        return None
    rnd, offset = divmod(block - s.start_block, s.round_length)
    round_start = s.start_block + rnd * s.round_length
    acc = 0
    for name, length in zip(PHASES, s.lengths, strict=True):
        if offset < acc + length:
            return Position(rnd, name, round_start + acc, round_start + acc + length - 1)
        acc += length
    raise AssertionError("offset beyond round length")  # unreachable: offset < round_length


def phase_bounds(s: Schedule, rnd: int, phase: str) -> tuple[int, int]:
    """First and last block (inclusive) of a phase of a round."""
    if rnd < 0:
        raise ValueError("round must be >= 0")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    i = PHASES.index(phase)
    start = s.start_block + rnd * s.round_length + sum(s.lengths[:i])
    return start, start + s.lengths[i] - 1


def commit_deadline(s: Schedule, rnd: int) -> int:
    """Last block at which a miner's commitment for `rnd` counts; its hash seeds evaluation."""
    return phase_bounds(s, rnd, "commit")[1]
