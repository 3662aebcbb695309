"""protocol.round.state: the one resumable-step mechanism every role's round runs on.

A recorded step returns its record; its `holds` check can send it back to work (or repair the
world first); steps run in order; state files written before the miner moved onto it still load.
"""

from __future__ import annotations

import json

import pytest

from protocol.round.state import RoundError, RoundStore, StepOrderError, round_step


class Toy:
    """A role with two steps; `fetch` holds while `self.present` says its file is there."""

    def __init__(self, root):
        self.rounds = RoundStore(root, records=("fetched", "used"))
        self.present, self.repairable, self.runs = True, False, []

    def _still_there(self, r, state):
        if not self.present and self.repairable:
            self.present = True  # fetched back: the record holds again
        return self.present

    @round_step("fetch", record="fetched", holds="_still_there")
    def fetch(self, r, state, value=1):
        self.runs.append(("fetch", state["fetched"]))  # a rerun sees the stale record
        return {"value": value}

    @round_step("use", after=fetch, record="used")
    def use(self, r, state):
        self.runs.append(("use", None))
        return {"from": state["fetched"]["value"]}


def test_a_fresh_round_lists_null_records_and_a_step_runs_once(tmp_path):
    toy = Toy(tmp_path)
    assert toy.rounds.load(0) == {"version": 1, "round": 0, "fetched": None, "used": None}
    assert toy.fetch(0, value=7) == {"value": 7} == toy.fetch(0, value=8)
    assert toy.use(0) == {"from": 7} and toy.use(0) == {"from": 7}
    assert toy.runs == [("fetch", None), ("use", None)]
    state = json.loads((tmp_path / "rounds" / "0.json").read_text())
    assert set(state["timings"]) == {"fetch", "use"}  # timings by step name, beside the records


def test_a_record_that_no_longer_holds_is_redone_or_repaired(tmp_path):
    toy = Toy(tmp_path)
    toy.fetch(0, value=1)
    toy.present = False
    assert toy.fetch(0, value=2) == {"value": 2}
    assert toy.runs[-1] == ("fetch", {"value": 1})
    toy.present, toy.repairable = False, True
    assert toy.fetch(0, value=3) == {"value": 2} and len(toy.runs) == 2  # repaired, not redone


def test_steps_run_in_order_and_a_null_record_is_not_a_record(tmp_path):
    toy = Toy(tmp_path)
    with pytest.raises(StepOrderError, match=r"fetch\(0\) has not run yet; run fetch\(0\) first"):
        toy.use(0)
    assert issubclass(StepOrderError, RoundError) and issubclass(StepOrderError, ValueError)
    toy.fetch(0)
    state = toy.rounds.load(0)
    toy.rounds.save(0, {**state, "fetched": None})  # as a crash before recording leaves it
    toy.fetch(0, value=5)
    assert toy.use(0) == {"from": 5}


def test_state_files_of_the_former_miner_format_load(tmp_path):
    # What miner.node.RoundState wrote (indent 2, every field, timings under the old names).
    old = {"round": 3, "trained": {"sha256": "ab"}, "uploaded": None, "manifest": None,
           "committed": None, "version": 1, "timings": {"train": 1.5}}  # fmt: skip
    (tmp_path / "rounds").mkdir()
    (tmp_path / "rounds" / "3.json").write_text(json.dumps(old, indent=2, sort_keys=True))
    store = RoundStore(tmp_path, records=("trained", "uploaded", "manifest", "committed"))
    assert store.load(3) == old
    with pytest.raises(ValueError, match="the state of round 3, not of round 4"):
        (tmp_path / "rounds" / "4.json").write_text(json.dumps(old))
        store.load(4)
    (tmp_path / "rounds" / "5.json").write_text(json.dumps({**old, "round": 5, "version": 2}))
    with pytest.raises(ValueError, match="state version 2, want 1"):
        store.load(5)
