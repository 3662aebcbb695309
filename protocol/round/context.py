"""What every role is built from: one small frozen record instead of a dozen constructor arguments.

    ctx = RoleContext(chain, store, schedule=chain.schedule(), chain_label=chain.label(),
                      task_id=0, base_dir="runs/base", assignment_path="runs/math.json")
    miner = Miner(ctx, data_spec="corpus:math", work_dir="runs/miner0", train=TrainSettings())

The runtime (protocol.round.runtime) builds one from the shared config sections and an open
chain and store; tests build one by hand around a FakeChain. Each role adds only its own
settings (state directory, evaluation or training settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.round.manifest import Manifest
from protocol.round.schedule import Schedule

if TYPE_CHECKING:
    from protocol.chain import Chain
    from protocol.identity.keys import Signer
    from protocol.round.lineage import Lineage
    from protocol.storage import Store

_ZERO_SHA = "0" * 64


@dataclass(frozen=True)
class RoleContext:
    """A role's chain client, store and the task facts every role of a network shares."""

    chain: Chain
    store: Store
    schedule: Schedule
    chain_label: str
    """The deployment manifests are signed for (Chain.label())."""
    task_id: int
    base_dir: Path
    """The root base model the assignment was selected on."""
    assignment_path: Path
    lineage: Lineage | None = None
    """With one, each round builds on the latest merged checkpoint (protocol.round.lineage)."""
    signer: Signer | None = None
    """The key manifests are signed with: a miner's; None for roles that sign none."""

    def __post_init__(self):
        # Checked here, by the manifest's own rules, so a role fails at construction rather
        # than after hours of training or at its first fetch.
        if not isinstance(self.schedule, Schedule):
            raise ValueError(
                f"schedule must be a protocol.round.schedule.Schedule, got {self.schedule!r}"
            )
        if not isinstance(self.task_id, int) or isinstance(self.task_id, bool) or self.task_id < 0:
            raise ValueError(f"task_id must be a non-negative integer, got {self.task_id!r}")
        try:
            z = _ZERO_SHA
            Manifest(self.chain_label, 0, 0, z, z, z, 1, "x", "0x" + "0" * 40, 0, "float32")
        except ValueError as e:
            raise ValueError(f"chain_label: {e}") from None
        object.__setattr__(self, "base_dir", Path(self.base_dir))
        object.__setattr__(self, "assignment_path", Path(self.assignment_path))
