"""The merger's settings: MergerSettings (how it merges, around the shared EvalSettings its
guard measures with) and the `[merger]` section of a role's TOML, with the other tasks it
composes (moesaic/config.py composes the whole file).

In TOML every settings key sits directly in `[merger]` (`method = "average"`,
`domain_batches = 24`, ...): the nested groups are flat there (protocol.config.flat_field).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.config import flat_field
from protocol.round.consensus import DEFAULT_STANDING_ALPHA
from protocol.settings import EvalSettings, check_ranges

METHODS = ("scaled", "average", "diloco")


@dataclass(frozen=True)
class MergerSettings:
    """How the merger merges and guards. Its evaluation settings should match the validators'
    so the guard measures on the batches the scores came from."""

    evaluation: EvalSettings = flat_field(EvalSettings)
    """How deltas are fetched and the guard measures (shared with the validators)."""
    method: str = "scaled"
    """"scaled": the consensus-weighted average times sqrt(N_eff) of the included deltas
    (protocol.moe.merge.contributor_scale; what docs/network.md measured best); "average": the
    plain weighted average; "diloco": an outer Nesterov step on that average."""
    max_scale: float = 4.0
    """Largest factor the "scaled" merge multiplies the average by (>= 1): sqrt(N_eff) grows
    with the number of paid miners; past 16 of them it stays at 4, one step the guard checks."""
    outer_lr: float = 0.7
    """DiLoCo outer learning rate (method "diloco")."""
    outer_momentum: float = 0.9
    """DiLoCo outer momentum (method "diloco"), in [0, 1)."""
    min_improvement: float = 1e-4
    """Smallest domain-gain lower bound (nats/batch) over the round's base for a delta to be
    merged: the validators' rule and default (validator.settings), applied to this round's
    measurement, so a delta that did not improve the domain this round is never merged."""
    base_model: str = ""
    """Hub id of the task's original base, written as base_model in each checkpoint's model card
    (README.md); empty: the card names the original base by its digest only."""
    standing_alpha: float = DEFAULT_STANDING_ALPHA
    """Weight of a round's agreement in each validator's standing, in (0, 1]
    (protocol.round.consensus): larger forgets a validator's record faster."""
    cumulative_general_tolerance: float = 0.15
    """Largest general-loss rise (nats/batch, upper bound) of a published checkpoint over the
    task's ORIGINAL base (protocol.round.drift); as the validators' (3x general_tolerance)."""

    def __post_init__(self):
        if not isinstance(self.evaluation, EvalSettings):
            raise ValueError(f"evaluation must be EvalSettings, got {self.evaluation!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_ranges(
            self,
            outer_lr=(lambda x: x > 0, "> 0"),
            max_scale=(lambda x: x >= 1, ">= 1"),
            outer_momentum=(lambda x: 0 <= x < 1, "in [0, 1)"),
            standing_alpha=(lambda x: 0 < x <= 1, "in (0, 1]"),
            min_improvement=(lambda x: x >= 0, "finite and >= 0"),
        )
        if not isinstance(self.base_model, str) or any(c in self.base_model for c in "\n\r:#'\""):
            raise ValueError(f"base_model must be a hub id like org/name, got {self.base_model!r}")
        if not self.cumulative_general_tolerance >= self.evaluation.general_tolerance:
            raise ValueError(
                f"cumulative_general_tolerance {self.cumulative_general_tolerance} is below "
                f"general_tolerance {self.evaluation.general_tolerance}"
            )


@dataclass(frozen=True)
class ComposeTask:
    """Another task whose accepted experts the merger composes into the same checkpoint."""

    task_id: int
    """The registry's id of that task."""
    assignment: str
    """Its assignment JSON (disjoint from [task]'s: `moesaic experts select --exclude`)."""
    domain: str
    """Its domain's data spec (that task's guard)."""


@dataclass(frozen=True)
class MergerConfig:
    """A merger process: its state directory and merge settings (flat in [merger])."""

    state_dir: str = "runs/merger"
    """Per-round records and merged checkpoints; reuse it after a crash to resume."""
    settings: MergerSettings = flat_field(MergerSettings)
    """The MergerSettings fields, written directly in [merger]."""
    compose: list[ComposeTask] = field(default_factory=list)
    """More tasks merged into each checkpoint beside [task]'s, e.g.
    compose = [{task_id = 1, assignment = "runs/code.json", domain = "corpus:code"}]"""

    def __post_init__(self):
        if not self.state_dir:
            raise ValueError("[merger] state_dir must not be empty")
