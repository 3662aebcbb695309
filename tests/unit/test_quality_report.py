"""The quality table's choices: best gain and matched drift are decided on validation only."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.quality_report import choose, write_report  # noqa: E402
from scripts.quality_table import Point  # noqa: E402


def pt(method, lr, val_math, val_gen, test_math=None, test_gen=None):
    tm = val_math if test_math is None else test_math
    tg = val_gen if test_gen is None else test_gen
    return Point(
        method,
        lr,
        None,
        {"math": val_math, "prose": val_gen, "code": val_gen},
        {"math": tm, "prose": tg, "code": tg},
        10,
        40,
        100.0,
        1.0,
    )


def test_best_gain_uses_validation_not_test():
    base = pt("base", None, 3.0, 2.0)
    a = pt("full", 1e-3, 2.0, 2.5, test_math=2.9)  # best on val, poor on test
    b = pt("full", 1e-4, 2.2, 2.1, test_math=1.0)
    _, best, _, _ = choose([base, a, b], None)
    assert best["full"] is a


def test_matched_drift_budget_defaults_to_the_most_conservative_best_point():
    base = pt("base", None, 3.0, 2.0)
    full_big = pt("full", 1e-3, 2.0, 2.5)  # drift 0.5
    full_small = pt("full", 1e-4, 2.6, 2.05)  # drift 0.05
    teft = pt("teft-token-ratio", 1e-2, 2.4, 2.1)  # drift 0.1 at its best
    _, best, matched, budget = choose([base, full_big, full_small, teft], None)
    assert best["full"] is full_big and best["teft-token-ratio"] is teft
    assert abs(budget - 0.1) < 1e-9
    assert matched["full"] is full_small and matched["teft-token-ratio"] is teft


def test_method_with_no_point_in_budget_is_reported_as_none(tmp_path):
    base = pt("base", None, 3.0, 2.0)
    pts = [base, pt("full", 1e-3, 2.0, 2.5), pt("lora", 1e-3, 2.9, 2.01)]
    _, _, matched, budget = choose(pts, 0.02)
    assert matched["full"] is None and matched["lora"] is not None and budget == 0.02
    meta = {
        "preset": "t",
        "preset_values": {"steps": 1, "batch_size": 1, "seq_len": 1, "test_batches": 1},
        "base_params": 1,
    }
    write_report(tmp_path, pts, meta, 0.02)
    md = (tmp_path / "quality.md").read_text()
    assert "no point within the budget" in md
    assert (tmp_path / "frontier.png").stat().st_size > 1000
