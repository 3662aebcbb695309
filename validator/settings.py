"""The validator's settings: ValidatorSettings (how it scores, around the shared EvalSettings)
and the `[validator]` section of a role's TOML (moesaic/config.py composes the whole file).

In TOML every settings key sits directly in `[validator]` (`domain_batches = 24`,
`ema_alpha = 0.2`, ...): the nested groups are flat there (protocol.config.flat_field).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.config import flat_field
from protocol.settings import EvalSettings, check_ranges


@dataclass(frozen=True)
class ValidatorSettings:
    """How a validator evaluates and scores. Validators of one network should agree on these:
    with other batches or thresholds they measure other things and their weights diverge."""

    evaluation: EvalSettings = flat_field(EvalSettings)
    """How deltas are fetched and measured (shared with the merger)."""
    min_improvement: float = 1e-4
    """Smallest domain-gain lower bound (nats/batch) that earns a score (protocol.round.scoring)."""
    similarity_threshold: float = 0.95
    """Delta cosine similarity at or above which a later commitment is a copy."""
    ema_alpha: float = 0.2
    """Weight of this round's score in the moving average, in (0, 1] (1: no memory)."""
    cumulative_general_tolerance: float = 0.15
    """Largest general-loss rise (nats/batch, upper bound) of base + delta over the task's
    ORIGINAL base, however many merges lie between (protocol.round.drift). 3x the per-round
    general_tolerance: a round may spend its whole allowance and honest lineages still have
    room for noise and a few rounds of small regressions, but not for unbounded drift."""

    def __post_init__(self):
        if not isinstance(self.evaluation, EvalSettings):
            raise ValueError(f"evaluation must be EvalSettings, got {self.evaluation!r}")
        check_ranges(
            self,
            min_improvement=(lambda x: x >= 0, "finite and >= 0"),
            similarity_threshold=(lambda x: 0 < x <= 1, "in (0, 1]"),
            ema_alpha=(lambda x: 0 < x <= 1, "in (0, 1]"),
        )
        if not self.cumulative_general_tolerance >= self.evaluation.general_tolerance:
            raise ValueError(
                f"cumulative_general_tolerance {self.cumulative_general_tolerance} is below "
                f"general_tolerance {self.evaluation.general_tolerance}: it would refuse, on the "
                "task base, a delta the round's own check allows"
            )


@dataclass(frozen=True)
class ValidatorConfig:
    """A validator process: its state directory and evaluation settings (flat in [validator])."""

    state_dir: str = "runs/validator"
    """Per-round records; reuse it after a crash to resume."""
    settings: ValidatorSettings = flat_field(ValidatorSettings)
    """The ValidatorSettings fields, written directly in [validator]."""

    def __post_init__(self):
        if not self.state_dir:
            raise ValueError("[validator] state_dir must not be empty")
