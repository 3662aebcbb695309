"""Per-round role state: one JSON file per round, replaced atomically, and resumable steps.

Every role (miner, validator, merger) runs a round as named steps. Each step's record is saved
in `<state_dir>/rounds/<round>.json` before it is returned, and a step whose record exists is
not run again, so a process killed at any point restarts and finishes the round with the same
result. Where a record stands for something outside the file (a delta on disk, an object in
the store), the step's `holds` hook checks that it still does, and may repair it, before the
record is trusted (the miner's steps, miner/node.py).
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


class StepOrderError(RoundError, ValueError):
    """A step was called before the step it builds on: a usage error, named as such."""


class RoundStore:
    """The round files under `<root>/rounds/`.

    `records` are step records a fresh round lists as null: the miner's files have always named
    all four of its steps, and readers (dashboard, tests) rely on it.
    """

    def __init__(self, root: str | Path, version: int = STATE_VERSION, records: tuple = ()):
        self.root, self.version, self.records = Path(root), version, tuple(records)

    def path(self, r: int) -> Path:
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"round must be a non-negative integer, got {r!r}")
        return self.root / "rounds" / f"{r}.json"

    def load(self, r: int) -> dict:
        """The round's state ({"version", "round"} and null records if nothing was recorded)."""
        path = self.path(r)
        if not path.exists():
            return {"version": self.version, "round": r, **dict.fromkeys(self.records)}
        state = json.loads(path.read_text())
        if state.get("version") != self.version:
            raise ValueError(f"{path}: state version {state.get('version')}, want {self.version}")
        if state.get("round", r) != r:
            raise ValueError(f"{path}: the state of round {state.get('round')}, not of round {r}")
        return state

    def save(self, r: int, state: dict) -> None:
        """Replace the round's file atomically: a kill leaves the old record or the new one."""
        write_text_atomic(self.path(r), json.dumps(state, indent=1, sort_keys=True) + "\n")


def round_step(name: str, after=None, *, record: str | None = None, holds: str | None = None):
    """Make `body(self, r, state, *args) -> record` a resumable step `step(r, *args) -> record`.

    `self.rounds` is the role's RoundStore. The record is kept under `record` (default: `name`;
    `name` is what timings and errors call the step). A recorded step returns its record as is,
    unless the role's method named by `holds`, `holds(r, state) -> bool`, says the world no
    longer matches it (it may repair the world first, and return True). Otherwise `after`, the
    step this one builds on (its name, or the decorated step itself where its record is named
    otherwise), must be recorded, and the body runs, seeing any stale record in `state`; its
    record is saved before it is returned. A body that raises records nothing. A record of
    None counts as not recorded.
    """
    key = record or name
    after_name, after_key = (after, after) if isinstance(after, str) or after is None else (
        after.step_name, after.record_key
    )  # fmt: skip

    def wrap(body):
        @functools.wraps(body)
        def step(self, r: int, *args, **kwargs):
            state = self.rounds.load(r)
            if state.get(key) is not None and (holds is None or getattr(self, holds)(r, state)):
                return state[key]
            if after_key is not None and state.get(after_key) is None:
                raise StepOrderError(
                    f"round {r}: {after_name}({r}) has not run yet; run {after_name}({r}) first"
                )
            started = time.monotonic()
            state[key] = body(self, r, state, *args, **kwargs)
            # Beside the records, not in them: records must be equal across reruns.
            state.setdefault("timings", {})[name] = round(time.monotonic() - started, 3)
            self.rounds.save(r, state)
            return state[key]

        del step.__wrapped__  # callers see step(r), not the body's (r, state)
        step.step_name, step.record_key = name, key
        return step

    return wrap
