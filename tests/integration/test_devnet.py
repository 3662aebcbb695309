"""`moesaic devnet` end to end, as the README runs it: 2 rounds, then the summary is checked.

.venv/bin/python -m pytest -q tests/integration/test_devnet.py     (~3 min on 2 cores)

Every process is real (anvil with the registry, the blob server, 6 miners: 3 honest, a lazy
one, a sybil copier and a front-runner, 2 validators, a merger, each `moesaic <role> run`);
this test reads what the devnet wrote: the JSON summary, the validators' round records, and
the checkpoint the devnet pulled with `moesaic checkpoint pull`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from storage_fixtures import ROOT


@pytest.fixture(scope="module")
def devnet(tmp_path_factory):
    out = tmp_path_factory.mktemp("devnet")
    summary_path = out / "summary.json"
    cmd = [sys.executable, "-m", "moesaic", "devnet", "--rounds", "2", "--out", str(out)]
    cmd += ["--json-summary", str(summary_path), "--timeout-s", "1500"]
    cmd += ["--dashboard-snapshot", str(out / "dash")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    print(done.stdout[-6000:], done.stderr[-4000:])
    return done, out, json.loads(summary_path.read_text()) if summary_path.exists() else None


@pytest.mark.slow
def test_devnet_improves_the_domain_and_pays_only_honest_miners(devnet):
    done, out, summary = devnet
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary is not None and summary["failures"] == []
    assert "== moesaic devnet summary ==" in done.stdout

    # The final merged checkpoint beats the base on held-out domain text, and general text
    # stays within the validators' tolerance in every published round.
    published = [r for r in summary["rounds"] if r["checkpoint"]]
    assert published and published[-1]["domain_gain"] > 0
    assert published[-1]["domain_loss"] < summary["base"]["domain_loss"]
    assert all(r["general_rise"] <= summary["general_tolerance"] for r in published)

    by_strategy: dict[str, list] = {}
    for m in summary["miners"]:
        by_strategy.setdefault(m["strategy"], []).append(m)
    assert len(by_strategy["honest"]) == 3
    for m in by_strategy["honest"]:
        assert any(x["weight"] > 0 and x["code"] == "ok" for x in m["rounds"]), m
    for r in range(2):  # the honest miners hold (almost) all of every round's weight
        assert sum(m["rounds"][r]["weight"] for m in by_strategy["honest"]) > 0.99
    (lazy,), (copier,), (front,) = (by_strategy[s] for s in ("lazy", "copier", "frontrunner"))
    assert all(x["weight"] == 0 for x in lazy["rounds"] + copier["rounds"] + front["rounds"])
    assert {x["code"] for x in lazy["rounds"]} <= {"no_improvement", "general_regression"}
    # The sybil's function-preserving copy of honest0's delta (issue 15): a duplicate.
    assert [x["code"] for x in copier["rounds"]] == ["duplicate", "duplicate"]
    # Nothing in the store to steal before the deadline: it committed another miner's digest.
    assert [x["code"] for x in front["rounds"]] == ["not_committer", "not_committer"]

    # Weights as read from the registry agree with what each validator says it sent.
    for r in ("0", "1"):
        on_chain = summary["weights_on_chain"][r]
        assert len(on_chain) == 2  # both validators
        for name in ("validator0", "validator1"):
            state = json.loads((out / name / "rounds" / f"{r}.json").read_text())
            sent = state["set_weights"]["on_chain"]
            assert sent in on_chain.values(), (name, sent, on_chain)
        honest_uids = {str(m["uid"]) for m in by_strategy["honest"]}
        for held in on_chain.values():
            assert set(held) <= honest_uids

    # Uploads are expert deltas only: smaller than the model in bf16, per round.
    for m in summary["miners"]:
        assert 0 < m["upload_bytes"] / 2 < summary["base"]["bf16_bytes"]


@pytest.mark.slow
def test_devnet_final_checkpoint_was_pulled_verified_and_loads(devnet):
    from transformers import AutoModelForCausalLM

    from protocol.identity.hashing import sha256_dir

    done, out, summary = devnet
    final = summary["final"]
    assert final["round"] == 1 and final["path"] == str(out / "final")
    assert sha256_dir(out / "final") == final["digest"] == final["pulled_digest"]
    assert summary["rounds"][1]["checkpoint"]["digest"] == final["digest"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) == summary["base"]["params"]


@pytest.mark.slow
def test_devnet_dashboard_in_headless_chromium_shows_the_run(devnet):
    from dashboard.browser import blank_reason

    done, out, summary = devnet
    html = (out / "dash" / "dashboard.html").read_text()
    png = out / "dash" / "dashboard.png"
    assert summary["dashboard"]["png"] == str(png)
    assert "moesaic dashboard - devnet" in html
    assert "Scores, round 1" in html and "Weights on chain, round 1" in html
    for m in summary["miners"]:
        assert m["address"] in html
    assert summary["final"]["digest"] in html
    assert "not_committer" in html and "no_improvement" in html  # the cheaters' reasons
    assert html.count("<svg") >= 2
    assert png.stat().st_size > 20_000 and blank_reason(png) is None
