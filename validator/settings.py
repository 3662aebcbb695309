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
            ema_alpha=(lambda x: 0 < x <= 1, "in (0, 1]"),
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
