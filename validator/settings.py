"""The validator's settings: ValidatorSettings (how it scores, around the shared EvalSettings)
and the `[validator]` section of a role's TOML (moesaic/config.py composes the whole file).

In TOML every settings key sits directly in `[validator]` (`domain_batches = 24`,
`ema_alpha = 0.2`, ...): the nested groups are flat there (protocol.config.flat_field).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.config import flat_field
from protocol.settings import EvalSettings, check_ranges
from validator.strategies import COLLUDING, COPIER, HONEST, STRATEGIES

# Fingerprint cosine at or above which a later commitment is a copy. On the test base
# (scripts/copies_table.py, docs/copies.md) every function-preserving copy measures 1.0000,
# noised / low-rank / fine-tuned-further copies 0.93-0.998, and the closest of 120 independent
# honest pairs 0.78: the threshold sits between the two.
FUNCTION_THRESHOLD = 0.9


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
    function_threshold: float = FUNCTION_THRESHOLD
    """Function fingerprint cosine (the experts' outputs on secret probes) at or above which a
    later commitment is a copy, whatever neuron order, sign or scale it uses
    (protocol.artifact.fingerprint; measured in docs/copies.md)."""
    ema_alpha: float = 0.2
    """Weight of this round's score in the moving average, in (0, 1] (1: no memory)."""
    strategy: str = HONEST
    """What the validator sets (validator.strategies): "honest"; "colluding" or "copier" only
    to run those attacks in tests and the devnet."""
    collude_with: str = ""
    """The miner hotkey a "colluding" validator gives all its weight to."""
    copy_from: str = ""
    """The validator hotkey a "copier" copies (empty: the lowest other uid with weights)."""
    cumulative_general_tolerance: float = 0.15
    """Largest general-loss rise (nats/batch, upper bound) of base + delta over the task's
    ORIGINAL base, however many merges lie between (protocol.round.drift). 3x the per-round
    general_tolerance: a round may spend its whole allowance and honest lineages still have
    room for noise and a few rounds of small regressions, but not for unbounded drift."""
    heldout: str = ""
    """This validator's PRIVATE held-out domain text, the data that decides scores: a data
    spec text:PATH (a file, or every .txt/.md/.py/.rst file under a directory), jsonl:PATH[#FIELD]
    or hf:PATH[#FIELD]; every document of it is held out. It must never leave this validator
    (unlike the settings above, each validator has its own). Empty: the task domain's packaged
    test split, which is public, so miners can train on it (docs/security.md)."""

    def __post_init__(self):
        if not isinstance(self.evaluation, EvalSettings):
            raise ValueError(f"evaluation must be EvalSettings, got {self.evaluation!r}")
        _check_heldout(self.heldout)
        check_ranges(
            self,
            min_improvement=(lambda x: x >= 0, "finite and >= 0"),
            similarity_threshold=(lambda x: 0 < x <= 1, "in (0, 1]"),
            function_threshold=(lambda x: 0 < x <= 1, "in (0, 1]"),
            ema_alpha=(lambda x: 0 < x <= 1, "in (0, 1]"),
        )
        _check_strategy(self.strategy, self.collude_with, self.copy_from)
        if not self.cumulative_general_tolerance >= self.evaluation.general_tolerance:
            raise ValueError(
                f"cumulative_general_tolerance {self.cumulative_general_tolerance} is below "
                f"general_tolerance {self.evaluation.general_tolerance}: it would refuse, on the "
                "task base, a delta the round's own check allows"
            )


# Data-spec kinds a held-out source may use (protocol.moe.data); corpus: is packaged, so public.
HELDOUT_KINDS = ("text", "jsonl", "hf")


def _check_heldout(spec) -> None:
    """The spec's shape only: whether its path exists and holds enough text is checked when the
    validator starts (validator.node), as configs load on machines without the data."""
    if not isinstance(spec, str):
        raise ValueError(f"heldout must be a data spec string, got {spec!r}")
    if not spec:
        return
    kind, sep, target = spec.partition(":")
    if kind == "corpus":
        raise ValueError(
            f"heldout {spec!r}: a packaged corpus is public (miners can train on it); name "
            "private text: text:PATH, jsonl:PATH[#FIELD] or hf:PATH[#FIELD]"
        )
    if not sep or kind not in HELDOUT_KINDS or not target.partition("#")[0]:
        raise ValueError(
            f"heldout {spec!r}: use text:PATH, jsonl:PATH[#FIELD] or hf:PATH[#FIELD] "
            "(empty: the public test split)"
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


def _check_strategy(strategy, collude_with, copy_from) -> None:
    """A strategy is one of STRATEGIES, and each hotkey setting belongs to its strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for name, value in (("collude_with", collude_with), ("copy_from", copy_from)):
        if not isinstance(value, str) or value != value.strip():
            raise ValueError(f"{name} must be a hotkey without spaces around it, got {value!r}")
    if strategy == COLLUDING and not collude_with:
        raise ValueError('strategy "colluding" needs collude_with: the miner hotkey it favours')
    if collude_with and strategy != COLLUDING:
        raise ValueError(f'collude_with is only for strategy "colluding", not {strategy!r}')
    if copy_from and strategy != COPIER:
        raise ValueError(f'copy_from is only for strategy "copier", not {strategy!r}')
