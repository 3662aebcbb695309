"""The miner's settings: the `[miner]` section of a role's TOML with its `[miner.train]` table
(moesaic/config.py composes the whole file).

`[miner.train]` is protocol.settings.TrainSettings, the one training-settings dataclass that
`moesaic miner train`'s flags, LocalJob and the training loop share; a bad value names its
`train.` key. `moesaic miner run --config F --dry-run` prints the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.settings import TrainSettings

# The strategies a config may name (miner/strategies.py maps each to its function; a test keeps
# the two equal). Names only, so loading a config imports no torch.
STRATEGY_NAMES = (
    "honest",
    "lazy",
    "copycat",
    "copier",
    "replay",
    "replay_relabel",
    "general_harm",
    "nan_some",
    "frontrunner",
    "deleter",
    "evalpool",
)


COPYING = ("copycat", "copier")  # the strategies that re-ship a partner miner's delta


@dataclass(frozen=True)
class MinerConfig:
    """A miner process: where it keeps its rounds and how it trains."""

    work_dir: str = "runs/miner"
    """Round state, deltas and manifests; reuse it after a crash to resume."""
    data: str = ""
    """Training data spec; empty: the task's domain."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Training settings ([miner.train])."""
    strategy: str = "honest"
    """honest (train); the others are the devnet's cheaters, who earn nothing
    (miner/strategies.py)."""
    copy_from: str = ""
    """copycat and copier only: the partner miner's work dir whose delta they re-ship (one
    operator's two hotkeys); empty for every other strategy."""

    def __post_init__(self):
        if not self.work_dir:
            raise ValueError("[miner] work_dir must not be empty")
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"[miner] strategy {self.strategy!r} unknown; one of {STRATEGY_NAMES}")
        copies = self.strategy in COPYING
        if copies and not self.copy_from:
            raise ValueError(
                f"[miner] strategy {self.strategy!r} needs copy_from (a partner's work_dir)"
            )
        if not copies and self.copy_from:
            raise ValueError(f"[miner] copy_from is only for the {COPYING} strategies")
        if copies and Path(self.copy_from) == Path(self.work_dir):
            raise ValueError("[miner] copy_from must be another miner's work_dir, not this one's")
