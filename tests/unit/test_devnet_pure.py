"""The devnet's pure parts: the clock's gates, the summary's verdict and table, round_base."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from moesaic.devnet.clock import Gate, gates
from moesaic.devnet.summary import _merger_record, check, format_summary
from protocol.chain import Checkpoint
from protocol.round.lineage import round_base
from protocol.round.schedule import Schedule, phase_bounds

SCHEDULE = Schedule(start_block=10, train=8, commit=24, reveal=1, evaluate=2, weights=12, merge=12)


def test_gates_hold_the_last_block_of_each_acting_phase():
    got = gates(SCHEDULE, 1, copy_lead=12)
    commit_last = phase_bounds(SCHEDULE, 1, "commit")[1]
    assert got == [
        Gate(commit_last - 12, 1, "copy_lead"),
        Gate(commit_last, 1, "commits"),
        # Miners upload after the deadline: the first evaluate block waits for their reveals.
        Gate(phase_bounds(SCHEDULE, 1, "evaluate")[0], 1, "reveals"),
        Gate(phase_bounds(SCHEDULE, 1, "evaluate")[1], 1, "weight_commits"),
        Gate(phase_bounds(SCHEDULE, 1, "weights")[1], 1, "weights"),
        Gate(phase_bounds(SCHEDULE, 1, "merge")[1], 1, "merge"),
    ]
    # No copycat lead when it would fall before the commit phase, or is switched off.
    kinds = ["commits", "reveals", "weight_commits", "weights", "merge"]
    assert [g.kind for g in gates(SCHEDULE, 0, copy_lead=0)] == kinds
    assert [g.kind for g in gates(SCHEDULE, 0, copy_lead=30)][0] == "commits"


def test_round_base_is_the_latest_earlier_rounds_checkpoint():
    c = [Checkpoint(r, f"{r:064x}", f"u{r}", "0" * 64, 100 + r, "0xm") for r in (0, 2, 5)]
    assert round_base(c, 0) is None
    assert round_base(c, 1).round == 0
    assert round_base(c, 2).round == 0  # round 2's own checkpoint is not its base
    assert round_base(c, 3).round == 2
    assert round_base(c, 9).round == 5


def _summary(**changes) -> dict:
    base = {"domain_loss": 5.0, "general_loss": 4.0, "params": 1000, "bf16_bytes": 2000}
    rounds = [
        {"round": 0, "merge": {"decision": "merged", "reason": "ok"},
         "checkpoint": {"digest": "ab" * 32, "uri": "u", "block": 9},
         "domain_loss": 4.9, "general_loss": 4.01, "domain_gain": 0.1, "general_rise": 0.01},
    ]  # fmt: skip
    miner = {"name": "honest0", "strategy": "honest", "uid": 0, "address": "0x1",
             "upload_bytes": 20, "upload_ratio": 100.0,
             "rounds": [{"round": 0, "score": 0.01, "weight": 1.0, "code": "ok", "reason": "r"}]}  # fmt: skip
    lazy = {**miner, "name": "lazy", "strategy": "lazy", "uid": 1,
            "rounds": [{"round": 0, "score": 0.0, "weight": 0.0, "code": "no_improvement",
                        "reason": "r"}]}  # fmt: skip
    summary = dict(
        base=base, rounds=rounds, miners=[miner, lazy], general_tolerance=0.05, wall_s=12.0,
        final={"round": 0, "digest": "ab" * 32, "path": "/x", "pulled_digest": "ab" * 32},
    )  # fmt: skip
    summary.update(changes)
    return summary


def test_a_healthy_run_passes_and_prints_every_miner():
    summary = _summary()
    assert check(summary) == []
    table = format_summary(summary)
    assert "honest0" in table and "lazy" in table and "(+0.1000)" in table
    assert "abababababababab" in table


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda s: s["rounds"][0].update(domain_gain=-0.01), "did not improve the domain loss"),
        (lambda s: s["rounds"][0].update(general_rise=0.2), "general loss rose"),
        (lambda s: s["miners"][1]["rounds"][0].update(weight=0.001), "lazy (lazy) earned"),
        (lambda s: s["rounds"][0].update(checkpoint=None), "no merged checkpoint"),
        (lambda s: s["final"].update(pulled_digest=None), "checkpoint pull did not verify"),
    ],
)
def test_each_failure_is_named(change, says):
    summary = _summary()
    change(summary)
    assert any(says in f for f in check(summary)), check(summary)


def test_time_split_counts_only_honest_training_and_names_the_rest_overhead():
    from moesaic.devnet.summary import time_split

    got = time_split(
        [
            ("miner", "honest", {"train": 10.0, "upload": 0.5, "commit": 0.5}),
            ("miner", "copycat", {"train": 30.0, "upload": 1.0}),  # waiting to copy: not work
            ("validator", None, {"collect": 0.2, "fetch": 0.8, "evaluate": 6.0}),
            ("merger", None, {"merge": 4.0, "publish": 1.0}),
        ]
    )
    assert got["training_s"] == 10.0 and got["evaluation_s"] == 10.0
    assert got["other_s"] == 4.0
    assert got["overhead_share"] == pytest.approx(4.0 / 24.0, abs=1e-3)
    assert time_split([])["overhead_share"] is None


def test_the_cast_always_has_three_honest_miners_two_validators_and_a_merger():
    from moesaic.devnet.run import cast_of

    default = cast_of(("lazy", "copycat"))
    roles = [role for _, role, _ in default]
    assert roles.count("validator") == 2 and roles.count("merger") == 1
    assert [s for _, r, s in default if r == "miner"] == ["honest"] * 3 + ["lazy", "copycat"]
    more = cast_of(("lazy", "general_harm", "nan_some", "lazy"))  # repeats are dropped
    assert [s for _, r, s in more if r == "miner"][3:] == ["lazy", "general_harm", "nan_some"]
    with pytest.raises(ValueError, match="replay"):
        cast_of(("replay",))  # earns round 0 honestly: not a devnet cheater


def test_the_summary_shows_each_validators_standing_from_the_merger_record(tmp_path):
    merger = SimpleNamespace(role="merger", own_dir=tmp_path)
    (tmp_path / "rounds").mkdir()
    validators = {"0xab": dict(hotkey="0xAB", agreement=0.0, standing=1.0, standing_after=0.7)}
    state = {"collect": {"validators": validators}, "merge": {"decision": "merged"}}
    (tmp_path / "rounds" / "0.json").write_text(json.dumps(state))
    got = _merger_record([merger], 0)
    assert got["validators"] == {"0xAB": {"agreement": 0.0, "standing": 0.7}}


def test_an_evalpool_miner_may_earn_but_not_more_than_honest_work():
    """The devnet's evalpool miner trains on public text (real work), so it may earn; earning
    well past the best honest miner means the scoring data leaked (issue 15)."""
    from moesaic.devnet.summary import EVALPOOL_SLACK

    honest = _summary()["miners"][0]
    evalpool = {**honest, "name": "evalpool", "strategy": "evalpool", "uid": 2}
    assert check(_summary(miners=[honest, evalpool])) == []  # as much as honest: fine
    rounds = [{**honest["rounds"][0], "weight": EVALPOOL_SLACK + 0.1}]
    failures = check(_summary(miners=[honest, {**evalpool, "rounds": rounds}]))
    assert any("evalpool" in f and "leaks" in f for f in failures), failures


def test_a_signal_raises_stopped_once_and_waits_for_a_shielded_block():
    """SIGTERM inside `shielded()` (a Popen and its registration) is held until the block ends;
    a second signal during the cleanup that follows is ignored; the handlers come back after."""
    import os
    import signal

    from moesaic.devnet.procs import StopOnSignals, Stopped

    before = signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(Stopped) as caught, StopOnSignals() as guard:
        with guard.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("registered")  # the shielded block finishes first
        done.append("unreachable")
    assert done == ["registered"] and caught.value.signum == signal.SIGTERM
    assert caught.value.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before

    with pytest.raises(Stopped) as caught, StopOnSignals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
        finally:  # the cleanup: a second signal must not interrupt it
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("cleaned up")
    assert caught.value.signum == signal.SIGINT and done[-1] == "cleaned up"


def test_stop_all_terminates_every_group_and_kills_one_that_ignores_sigterm():
    import subprocess
    import sys
    import time

    from moesaic.devnet.procs import spawn, stop_all

    started: list = []
    polite = spawn([sys.executable, "-c", "import time; time.sleep(60)"], started)
    stubborn = spawn(
        [sys.executable, "-c",
         "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)"],
        started, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert started == [polite, stubborn]
    stubborn.stdout.readline()  # its SIGTERM handler is set
    begun = time.monotonic()
    stop_all(started, grace=1.0)
    assert polite.returncode == -15 and stubborn.returncode == -9
    assert time.monotonic() - begun < 5  # one shared grace period, not one per process


def _round(r: int, domain: float | None, general: float | None = None) -> dict:
    """A summary row: published (with losses) when domain is given, kept otherwise."""
    if domain is None:
        return {"round": r, "merge": {"decision": "kept_previous"}, "checkpoint": None}
    return {"round": r, "merge": {"decision": "merged"}, "checkpoint": {"digest": "cd" * 32},
            "domain_loss": domain, "general_loss": general}  # fmt: skip


def test_the_curve_reads_each_line_against_the_original_base_and_carries_kept_rounds():
    from moesaic.devnet.summary import curve

    base = {"domain_loss": 5.0, "general_loss": 4.0}
    rounds = [_round(0, None), _round(1, 4.8, 4.02), _round(2, None), _round(3, 4.5, 4.03)]
    solo = [
        {"domain_loss": d, "general_loss": 4.0 + i / 100}
        for i, d in enumerate((4.9, 4.8, 4.7, 4.6))
    ]
    got = curve(base, rounds, solo)
    net = [row["network"] for row in got]
    # Round 0 merged nothing: the network is still the original base.
    assert net[0] == {"domain_loss": 5.0, "general_loss": 4.0, "domain_gain": 0.0,
                      "general_drift": 0.0, "checkpoint_round": None}  # fmt: skip
    # Round 2 kept round 1's checkpoint: the same point, named by the checkpoint measured.
    assert net[2] == net[1] and net[1]["checkpoint_round"] == 1
    assert net[3]["domain_gain"] == pytest.approx(0.5)
    assert net[3]["general_drift"] == pytest.approx(0.03)
    assert [row["solo"]["domain_gain"] for row in got] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert got[3]["solo"]["general_drift"] == pytest.approx(0.03)
    assert [row["solo"] for row in curve(base, rounds, None)] == [None] * 4
    with pytest.raises(ValueError, match="solo line has 3 rounds, the network 4"):
        curve(base, rounds, solo[:3])


def test_the_check_reads_the_networks_final_point_on_the_fixed_set():
    from moesaic.devnet.summary import curve

    summary = _summary()
    summary["curve"] = curve(summary["base"], summary["rounds"])
    assert check(summary) == []
    summary["curve"][-1]["network"]["domain_gain"] = -0.02  # worse than the original base
    failures = check(summary)
    assert any("fixed held-out set" in f and "-0.0200" in f for f in failures), failures


def test_the_table_prints_network_and_solo_per_round():
    from moesaic.devnet.summary import curve

    summary = _summary()
    solo = [{"domain_loss": 4.95, "general_loss": 4.005}]
    summary["curve"] = curve(summary["base"], summary["rounds"], solo)
    summary["fixed_set"] = {"seed": 0, "domain_batches": 24, "general_batches": 24,
                            "digest": "ef" * 32}  # fmt: skip
    table = format_summary(summary)
    assert "network vs solo on the fixed held-out set (seed 0, 24 domain + 24 general" in table
    row = next(line for line in table.splitlines() if "(r0)" in line)
    assert row.split() == ["0", "4.9000", "+0.1000", "+0.0100", "(r0)", "4.9500", "+0.0500",
                           "+0.0050"]  # fmt: skip
    summary["curve"][0]["solo"] = None
    assert "(not run)" in format_summary(summary)


def test_targets_count_improving_rounds_paid_honest_miners_and_merge_wins():
    from moesaic.devnet.summary import curve, target_lines, targets

    rounds = [_round(0, 4.9, 4.0), _round(1, None), _round(2, 4.95, 4.1), _round(3, 4.7, 4.05)]
    for r, won in zip(rounds, (True, None, False, True), strict=True):
        r["merge"]["merge_beats_best_single"] = won  # None: the guard measured nothing
    honest = {"name": "honest0", "strategy": "honest", "rounds": [
        {"round": r, "score": s} for r, s in enumerate((0.1, 0.2, 0.0, 0.3))]}  # fmt: skip
    lazy = {"name": "lazy", "strategy": "lazy", "rounds": [
        {"round": r, "score": 0.0} for r in range(4)]}  # fmt: skip
    summary = _summary(rounds=rounds, miners=[honest, lazy], cumulative_tolerance=0.15)
    summary["curve"] = curve(summary["base"], rounds)
    t = targets(summary)
    # Round 1 kept the checkpoint (no improvement), round 2's is worse than round 0's.
    assert (t["improved"], t["rounds"]) == (2, 4)
    assert t["honest_paid"] == 3  # the honest miner scored zero in round 2; lazy is not counted
    assert (t["merge_won"], t["merge_measured"]) == (2, 3)
    assert t["drift"] == pytest.approx(0.05)
    summary["targets"] = t
    assert "improved the fixed-set domain loss in 2 of 4 rounds" in target_lines(summary)[0]


def test_the_drift_check_bounds_the_rise_over_the_original_base_by_the_cumulative_tolerance():
    rounds = _summary()["rounds"]
    rounds[0]["general_rise"] = 0.08  # past the per-round 0.05, inside the cumulative 0.15
    assert check(_summary(rounds=rounds, cumulative_tolerance=0.15)) == []
    rounds[0]["general_rise"] = 0.16
    failures = check(_summary(rounds=rounds, cumulative_tolerance=0.15))
    assert any("cumulative tolerance 0.15" in f for f in failures), failures


def test_a_validator_that_did_not_vote_is_printed_not_crashed_on():
    summary = _summary()
    summary["rounds"][0]["merge"]["validators"] = {
        "0xAB": {"agreement": None, "standing": 0.9}, "0xCD": {"agreement": 0.5, "standing": 1.0}
    }  # fmt: skip
    summary["validators"] = {"0xab": "weightcopier", "0xcd": "validator0"}
    text = format_summary(summary)
    assert "weightcopier 0.90 (did not vote)" in text and "validator0 1.00 (0.50)" in text
