"""The devnet's block producer: one block every `block_s` seconds, patient at phase ends.

Anvil runs with automine off; this clock mines each block (with whatever transactions are
pending) by `anvil_mine`. A public chain never waits for anyone, but on a small shared machine
a miner that trains a few seconds slower than planned would miss its deadline and the run would
measure the machine, not the protocol. So before mining the LAST block of a phase in which the
devnet's processes must act, the clock waits (up to `patience_s`) until their transactions have
landed or are pending (they then land in that block):

- commit phase, `copy_lead` blocks before its end: every miner but the copycat and the
  front-runner has committed, so they have something to copy in the blocks that remain;
- commit phase end: every miner has committed;
- reveal phase end (the first evaluate block is held): every miner that committed has revealed
  (uploaded its delta and manifest). Miners upload only after the deadline, and a reveal phase
  of one short block is less time than an upload takes on a loaded machine;
- evaluate phase end: every validator has committed its weights (their hash; validators
  evaluate within the evaluate phase, however long the machine takes);
- weights phase end: every validator has set (revealed) its weights;
- merge phase end: the merger has published its checkpoint or recorded that it keeps the
  previous one.

Which gates exist is a pure function of the schedule (`gates`); a slow machine changes the wall
time of a run, never its outcome. A gate that runs out of patience is logged and passed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.round.schedule import Schedule, phase_bounds

log = logging.getLogger("moesaic.devnet")


@dataclass(frozen=True)
class Gate:
    block: int  # the block not mined until `kind` for `round` is satisfied
    round: int
    kind: str  # "copy_lead" | "commits" | "reveals" | "weight_commits" | "weights" | "merge"


def gates(schedule: Schedule, r: int, copy_lead: int) -> list[Gate]:
    """Round r's gates in block order."""
    commit_last = phase_bounds(schedule, r, "commit")[1]
    out = [Gate(commit_last, r, "commits")]
    out.append(Gate(phase_bounds(schedule, r, "evaluate")[0], r, "reveals"))
    if copy_lead > 0 and commit_last - copy_lead >= phase_bounds(schedule, r, "commit")[0]:
        out.insert(0, Gate(commit_last - copy_lead, r, "copy_lead"))
    out.append(Gate(phase_bounds(schedule, r, "evaluate")[1], r, "weight_commits"))
    out.append(Gate(phase_bounds(schedule, r, "weights")[1], r, "weights"))
    out.append(Gate(phase_bounds(schedule, r, "merge")[1], r, "merge"))
    return out


class Clock(threading.Thread):
    """Mines blocks until stopped; `ready(gate) -> bool` answers whether a gate may pass."""

    def __init__(
        self,
        mine: Callable[[], None],
        head: Callable[[], int],
        schedule: Schedule,
        ready: Callable[[Gate], bool],
        *,
        block_s: float,
        patience_s: float,
        copy_lead: int,
        rounds: int,
    ):
        super().__init__(daemon=True, name="devnet-clock")
        self.mine, self.head, self.ready = mine, head, ready
        self.block_s, self.patience_s = block_s, patience_s
        self.stopped = threading.Event()
        pending = [g for r in range(rounds) for g in gates(schedule, r, copy_lead)]
        self.gates: dict[int, list[Gate]] = {}  # several gates may fall on one block
        for g in pending:
            self.gates.setdefault(g.block, []).append(g)
        self.waited: list[dict] = []  # per gate: how long it held the chain, and whether it gave up
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.block_s):
                for gate in self.gates.get(self.head() + 1, ()):
                    self._hold(gate)
                self.mine()
        except BaseException as e:  # surfaced by the devnet loop, which stops the run
            self.error = e

    def _hold(self, gate: Gate) -> None:
        started = time.monotonic()
        while not self.stopped.is_set():
            if self.ready(gate):
                break
            if time.monotonic() - started > self.patience_s:
                log.warning("clock: gave up waiting for %s of round %d", gate.kind, gate.round)
                break
            self.stopped.wait(0.2)
        held = time.monotonic() - started
        self.waited.append(dict(round=gate.round, kind=gate.kind, block=gate.block, held_s=held))
