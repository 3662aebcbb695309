"""scripts/bench_network.py: the quick run's output has every arm, finite curves and a summary;
its pure rules (the expert partition, rounds to a target, loss at a drift budget) on small inputs."""

from __future__ import annotations

import json
import math

import pytest

from protocol.moe.experts import Assignment
from scripts import bench_network as bench


def test_partition_deals_disjoint_parts_that_cover_the_assignment():
    a = Assignment({0: (1, 3, 5), 2: (0, 7)}, "token-ratio", 0.3, "ab" * 32, 8)
    parts = bench.partition(a, 2)
    pairs = [set(p.pairs()) for p in parts]
    assert pairs[0].isdisjoint(pairs[1])
    assert pairs[0] | pairs[1] == set(a.pairs())
    assert all(p.model_hash == a.model_hash for p in parts)
    with pytest.raises(ValueError, match="cannot split 5 experts among 6"):
        bench.partition(a, 6)


def test_rounds_to_and_loss_at_drift():
    assert bench.rounds_to([5.0, 4.8, 4.5, 4.4], 4.5) == 2
    assert bench.rounds_to([5.0, 4.8], 4.5) is None
    domain, general = [5.0, 4.6, 4.3, 4.1], [3.0, 3.05, 3.12, 3.3]
    assert bench.loss_at_drift(domain, general, 0.15) == 4.3
    assert bench.loss_at_drift(domain, general, 0.01) == 5.0


def test_quick_run_writes_finite_curves_for_every_arm(tmp_path):
    out = tmp_path / "network.json"
    rc = bench.main(["--quick", "--out-dir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    names = bench.QUICK_ARMS.split(",")
    assert set(report["curves"]) == set(names)
    rounds = report["setup"]["rounds"]
    for name in names:
        (run,) = report["curves"][name]
        assert len(run["domain"]) == len(run["general"]) == rounds + 1
        assert all(math.isfinite(x) for x in run["domain"] + run["general"])
        row = report["summary"]["arms"][name]
        assert math.isfinite(row["gain"]) and math.isfinite(row["drift"])
    # Every arm starts from the same base on the same fixed set.
    starts = {report["curves"][n][0]["domain"][0] for n in names}
    assert len(starts) == 1
    # Full fine-tuning moves the model; a network arm's miners are scored every round.
    assert report["summary"]["arms"]["full-steps-2"]["gain"] > 0
    assert len(report["curves"]["avg-2"][0]["scores"][0]) == 2
    assert set(report["summary"]["targets"]) >= {"avg-2", "partition-2"}
    assert (tmp_path / "network.png").stat().st_size > 0


def test_summarize_compares_each_network_arm_with_central_on_the_same_tokens():
    def run(domain, general):
        return [{"domain": domain, "general": general, "rounds": len(domain) - 1}]

    results = {
        "solo": run([5.0, 4.9, 4.8], [3.0, 3.01, 3.02]),
        "scaled-2": run([5.0, 4.7, 4.5], [3.0, 3.05, 3.3]),
        "central-steps-2": run([5.0, 4.6, 4.0], [3.0, 3.1, 3.5]),
        "central-steps-4": run([5.0, 4.0, 3.0], [3.0, 3.1, 3.5]),
    }
    summary = bench.summarize(results)
    row = summary["arms"]["scaled-2"]
    # Same tokens: N = 2 is held against central-steps-2, not the N = 4 reference.
    assert row["central_same_tokens"] == "central-steps-2"
    assert row["share_of_central_same_tokens"] == pytest.approx(0.5 / 1.0)
    # At drift 0.15 scaled-2 may use round 1 only (0.3), central-steps-2 round 1 (0.4).
    assert row["share_at_drift"]["0.15"] == pytest.approx(0.3 / 0.4)
    target = summary["targets"]["scaled-2"]
    assert target["a_rounds_to_solo_le_half"] is True  # 4.7 <= 4.8 in round 1 of 2
    assert target["b_share_of_central_ge_95pct"] is False
    assert target["b_at_drift_0.15_ge_95pct"] is False
