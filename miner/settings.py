"""The miner's settings: the `[miner]` section of a role's TOML with its `[miner.train]` table
(moesaic/config.py composes the whole file).

`[miner.train]` is protocol.settings.TrainSettings, the one training-settings dataclass that
`moesaic miner train`'s flags, LocalJob and the training loop share; a bad value names its
`train.` key. `moesaic miner run --config F --dry-run` prints the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miner.strategies import STRATEGIES
from protocol.settings import TrainSettings


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

    def __post_init__(self):
        if not self.work_dir:
            raise ValueError("[miner] work_dir must not be empty")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"[miner] strategy {self.strategy!r} unknown; one of {tuple(STRATEGIES)}"
            )
