"""The round schedule is a pure function of the block number."""

import pytest

from protocol.round.schedule import PHASES, Schedule, commit_deadline, phase_bounds, position


def test_phases_in_order_and_rounds_repeat():
    s = Schedule(start_block=10, train=3, commit=2, reveal=1, evaluate=2, weights=1, merge=1)
    assert s.round_length == 10
    assert position(s, 9) is None
    seen = [position(s, b).phase for b in range(10, 20)]
    assert seen == ["train"] * 3 + ["commit"] * 2 + ["reveal"] + ["evaluate"] * 2 + [
        "weights",
        "merge",
    ]
    p = position(s, 23)
    assert (p.round, p.phase, p.phase_start, p.phase_end) == (1, "commit", 23, 24)


def test_bounds_agree_with_position_everywhere():
    s = Schedule(start_block=5, train=4, commit=3, reveal=2, evaluate=3, weights=2, merge=1)
    for rnd in range(4):
        for phase in PHASES:
            lo, hi = phase_bounds(s, rnd, phase)
            for b in (lo, hi):
                p = position(s, b)
                assert (p.round, p.phase, p.phase_start, p.phase_end) == (rnd, phase, lo, hi)
    assert commit_deadline(s, 2) == phase_bounds(s, 2, "commit")[1]


@pytest.mark.parametrize("kw", [{"train": 0}, {"merge": -1}, {"start_block": -1}])
def test_invalid_schedules(kw):
    with pytest.raises(ValueError):
        Schedule(**kw)
