"""The cumulative curve on the dashboard and in the report: where it is read from, what is drawn."""

from __future__ import annotations

import json

from dashboard.page import curve_series
from dashboard.state import read_curve

BASE = {"domain_loss": 5.0, "general_loss": 4.0}


def _point(domain: float, drift: float) -> dict:
    return {"domain_loss": domain, "general_loss": 4.0 + drift, "domain_gain": 5.0 - domain,
            "general_drift": drift, "checkpoint_round": 0}  # fmt: skip


CURVE = [
    {"round": 0, "network": _point(4.9, 0.01), "solo": _point(4.95, 0.02)},
    {"round": 1, "network": _point(4.8, 0.02), "solo": None},  # the solo line did not run
]


def test_the_curve_comes_from_a_summary_file_or_a_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "summary").mkdir(parents=True)
    doc = {"base": BASE, "curve": CURVE, "fixed_set": {"seed": 0}}
    (run / "summary" / "summary.json").write_text(json.dumps(doc))
    got = read_curve([run])
    assert got["source"] == str(run / "summary" / "summary.json") and got["curve"] == CURVE
    # A named file comes first; one without a curve (not a devnet summary) is passed over.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "curve": CURVE[:1]}))
    assert read_curve([other, run])["curve"] == CURVE[:1]
    (tmp_path / "plain.json").write_text(json.dumps({"rounds": []}))
    assert read_curve([tmp_path / "plain.json", run])["source"].endswith("summary/summary.json")
    # Nothing there yet (a run still going), or unreadable: no curve, and the problem is named.
    assert read_curve([tmp_path / "missing"]) is None
    (tmp_path / "bad.json").write_text("{not json")
    problems: list[str] = []
    assert read_curve([tmp_path / "bad.json"], problems) is None
    assert problems and "bad.json: unreadable" in problems[0]


def test_each_line_is_one_series_in_both_charts():
    series = curve_series({"curve": {"base": BASE, "curve": CURVE}})
    assert series["cumulative"] == {
        "original base": [(0, 5.0), (1, 5.0)],
        "network": [(0, 4.9), (1, 4.8)],
        "solo": [(0, 4.95)],
    }
    # Same names in the same order: each line keeps its colour from one chart to the other.
    assert list(series["drift"]) == list(series["cumulative"])
    assert series["drift"]["original base"] == [(0, 0.0), (1, 0.0)]
    assert series["drift"]["network"] == [(0, 0.01), (1, 0.02)]
    assert curve_series({"curve": None}) == {
        "cumulative": {"original base": [], "network": [], "solo": []},
        "drift": {"original base": [], "network": [], "solo": []},
    }
