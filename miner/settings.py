"""The miner's settings: the `[miner]` section of a role's TOML with its `[miner.train]` table
(moesaic/config.py composes the whole file).

`[miner.train]` is protocol.settings.TrainSettings, the one training-settings dataclass that
`moesaic miner train`'s flags, LocalJob and the training loop share; a bad value names its
`train.` key. `moesaic miner run --config F --dry-run` prints the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.settings import TrainSettings

# The strategies a config may name (miner/strategies.py maps each to its function; a test keeps
# the two equal). Names only, so loading a config imports no torch.
STRATEGY_NAMES = (
    "honest",
    "lazy",
    "copycat",
    "replay",
    "replay_relabel",
    "general_harm",
    "nan_some",
    "evalpool",
)


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
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"[miner] strategy {self.strategy!r} unknown; one of {STRATEGY_NAMES}")
