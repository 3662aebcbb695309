"""Per-round role state: one JSON file per round, replaced atomically, and resumable steps.

A role (validator, merger) runs a round as named steps. Each step's record is saved in
`<state_dir>/rounds/<round>.json` before it is returned, and a step whose record exists is not
run again, so a process killed at any point restarts and finishes the round with the same
result.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from protocol.ops.atomic import write_text_atomic

STATE_VERSION = 1


class RoundError(RuntimeError):
    """A step was asked for too early (phase not reached) or before the step it builds on."""


class RoundStore:
    """The round files under `<root>/rounds/`."""

    def __init__(self, root: str | Path, version: int = STATE_VERSION):
        self.root, self.version = Path(root), version

    def path(self, r: int) -> Path:
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"round must be a non-negative integer, got {r!r}")
        return self.root / "rounds" / f"{r}.json"

    def load(self, r: int) -> dict:
        """The round's state ({"version", "round"} if nothing was recorded yet)."""
        path = self.path(r)
        if not path.exists():
            return {"version": self.version, "round": r}
        state = json.loads(path.read_text())
        if state.get("version") != self.version:
            raise ValueError(f"{path}: state version {state.get('version')}, want {self.version}")
        return state

    def save(self, r: int, state: dict) -> None:
        """Replace the round's file atomically: a kill leaves the old record or the new one."""
        write_text_atomic(self.path(r), json.dumps(state, indent=1, sort_keys=True) + "\n")


def round_step(name: str, after: str | None = None):
    """Make `body(self, r, state) -> record` a resumable step `step(r) -> record`.

    `self.rounds` is the role's RoundStore. The record already in the round's state is returned
    as is; otherwise `after`'s record must exist, and the body's record is saved before it is
    returned. A body that raises records nothing.
    """

    def wrap(body):
        @functools.wraps(body)
        def step(self, r: int) -> dict:
            state = self.rounds.load(r)
            if name not in state:
                if after is not None and after not in state:
                    raise RoundError(f"round {r}: run {after}({r}) first")
                started = time.monotonic()
                state[name] = body(self, r, state)
                # Beside the records, not in them: records must be equal across reruns.
                state.setdefault("timings", {})[name] = round(time.monotonic() - started, 3)
                self.rounds.save(r, state)
            return state[name]

        del step.__wrapped__  # callers see step(r), not the body's (r, state)
        return step

    return wrap
