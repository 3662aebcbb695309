"""The dashboard on a real chain, read by a real browser.

.venv/bin/python -m pytest -q tests/integration/test_dashboard.py

A registry on anvil gets two miners' commitments, a validator's weights and a merger's
checkpoint through EvmChain calls; validator, merger and miner state directories are written
in the documented round-record shape (checked against validator.node.explain_state, the real
reader). `moesaic dashboard` then serves them on 127.0.0.1 from its own process, headless
Chromium (Debian's package) dumps the DOM and takes a screenshot, and the test checks the page
names the round, every miner's score and reason, the weights and the checkpoint digest, and
that the screenshot is a real picture. `moesaic report` draws the same run as PNGs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from html import escape
from pathlib import Path

import pytest
from conftest import free_port, stop
from storage_fixtures import wait_http

from dashboard.browser import CHROMIUM, blank_reason, chromium
from protocol.round.schedule import Schedule, phase_bounds

ROOT = Path(__file__).resolve().parents[2]
LEAD = 12  # blocks before round 0: registration and roles take about 6 transactions
REASONS = {
    0: "domain gain LCB 0.0412 > 0 at 95% (mean 0.0583 over 8 batches)",
    1: "general loss rose 0.0912 > tolerance 0.05: zeroed",
}


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))


def _validator_record(r, hotkeys, uids, deadline, block_hash, weights) -> dict:
    """A validator round as validator/node.py records it (steps collect .. set_weights)."""
    a, b = hotkeys
    outcomes = {
        a: {
            "value": 0.0412,
            "code": "ok",
            "reason": REASONS[0],
            "rejection": None,
            "duplicate_of": None,
            "domain_lcb": 0.0412,
            "domain_mean": 0.0583,
            "general_mean": -0.0021,
        },
        b: {
            "value": 0.0,
            "code": "general_regression",
            "reason": REASONS[1],
            "rejection": None,
            "duplicate_of": None,
            "domain_lcb": 0.0105,
            "domain_mean": 0.0298,
            "general_mean": 0.0912,
        },
    }
    entries = [
        {"hotkey": h, "digest": _h(h), "block": deadline - 1, "tiebreak": i}
        for i, h in enumerate(hotkeys)
    ]
    fetched = {
        h: {
            "path": f"artifacts/{r}/{h}.safetensors",
            "size": 40960 + i,
            "artifact_sha256": _h("a" + h),
            "block": deadline - 1,
            "tiebreak": i,
        }
        for i, h in enumerate(hotkeys)
    }
    return {
        "version": 1,
        "round": r,
        "collect": {
            "deadline": deadline,
            "block_hash": block_hash,
            "entries": entries,
            "base": {"dir": "runs/base", "digest": _h("base")},
        },
        "fetch": {"fetched": fetched, "rejected": {}},
        "evaluate": {"seed": 1234, "eval_set_digest": _h("eval"), "outcomes": outcomes},
        "score": {
            "previous_round": None,
            "uids": {h: uids[h] for h in hotkeys},
            "averages": {a: 0.0412 * (r + 1) / 2, b: 0.0},
            "weights": {"uids": [uids[a]], "weights": [1.0]},
        },
        "set_weights": {"status": "sent", "block": deadline + 3, "on_chain": weights},
    }


def _merger_record(r, hotkey, base, merged, single, checkpoint) -> dict:
    record = {
        "version": 1,
        "round": r,
        "collect": {
            "accepted": [
                {"uid": 1, "hotkey": hotkey, "weight": 1.0, "digest": _h(hotkey), "block": 1}
            ],
            "skipped": {},
        },
        "fetch": {"fetched": {}, "rejected": {}},
        "merge": {
            "decision": "merged",
            "reason": f"merge {merged:.4f} beats best single {single:.4f}",
            "base_domain_mean": base,
            "candidates": {
                "merged": {"domain_mean": merged, "general_rise": 0.01},
                hotkey: {"domain_mean": single, "general_rise": 0.02},
            },
            "included": [[hotkey, _h("a" + hotkey), 1.0]],
        },
    }
    if checkpoint:
        record["publish"] = {"status": "sent", **checkpoint}
    return record


@pytest.fixture(scope="module")
def network(tmp_path_factory, anvil_node):
    """A registry with round 0 committed, weighted and checkpointed, plus the roles' state."""
    from protocol.chain.evm import EvmChain, deploy_registry
    from validator.explain import explain_state

    tmp = tmp_path_factory.mktemp("dashboard")
    w3, accounts = anvil_node.w3, anvil_node.accounts
    owner, miners, validator, merger = accounts[0], accounts[1:3], accounts[3], accounts[4]
    schedule = Schedule(
        start_block=w3.eth.block_number + LEAD,
        train=3,
        commit=4,
        reveal=1,
        evaluate=1,
        weights=4,
        merge=4,
    )
    registry = deploy_registry(w3, owner, schedule)
    admin = EvmChain(w3, registry, owner)
    clients = {a.address: EvmChain(w3, registry, a) for a in [*miners, validator, merger]}
    uids = {a.address: clients[a.address].register() for a in [*miners, validator]}
    admin.authorise_validator(validator.address)
    admin.set_merger(merger.address)

    anvil_node.mine_to(phase_bounds(schedule, 0, "commit")[0])
    hotkeys = [m.address for m in miners]
    for h in hotkeys:
        clients[h].commit(0, _h(h))
    vote = ([uids[h] for h in hotkeys], [0.8, 0.2], bytes(32))
    anvil_node.mine_to(phase_bounds(schedule, 0, "evaluate")[0])
    clients[validator.address].commit_weights(0, *vote)
    anvil_node.mine_to(phase_bounds(schedule, 0, "weights")[0])
    clients[validator.address].set_weights(0, *vote)
    anvil_node.mine_to(phase_bounds(schedule, 0, "merge")[0])
    digest, deltas = _h("checkpoint-0"), _h("deltas-0")
    uri = "http://127.0.0.1:1/objects/" + _h("manifest-0")
    block = clients[merger.address].publish_checkpoint(0, digest, uri, deltas)

    reader = EvmChain(w3, registry)
    deadline = phase_bounds(schedule, 0, "commit")[1]
    on_chain = {str(u): w for u, w in reader.weights(0)[uids[validator.address]].items()}
    run = tmp / "run"
    for r in (0, 1):
        _write(
            run / "validator0" / "rounds" / f"{r}.json",
            _validator_record(r, hotkeys, uids, deadline, reader.block_hash(deadline), on_chain),
        )
        checkpoint = {"digest": digest, "uri": uri, "block": block} if r == 0 else None
        base, merged, single = 3.2 - 0.3 * r, 3.0 - 0.35 * r, 3.05 - 0.3 * r
        _write(
            run / "merger" / "rounds" / f"{r}.json",
            _merger_record(r, hotkeys[0], base, merged, single, checkpoint),
        )
        for i, h in enumerate(hotkeys):
            trained = {
                "file": f"{r}.delta.safetensors",
                "sha256": _h(f"d{r}{h}"),
                "bytes": 40960,
                "tokens": 8192,
                "first_loss": 4.1 - 0.2 * r,
                "last_loss": 3.4 - 0.25 * r,
                "meta": {},
            }
            _write(
                run / f"miner{i}" / "rounds" / f"{r}.json",
                {
                    "version": 1,
                    "round": r,
                    "trained": trained,
                    "uploaded": None,
                    "manifest": None,
                    "committed": {"digest": _h(h), "block": deadline - 1},
                },
            )
    # A devnet summary's cumulative curve (moesaic.devnet.summary.curve's shape): round 1 kept
    # round 0's checkpoint; the solo line gains a little each round.
    base_losses = {"domain_loss": 3.2, "general_loss": 2.5}
    curve = [
        {"round": r, "network": _point(base_losses, 3.0, 2.51, 0),
         "solo": _point(base_losses, 3.1 - 0.05 * r, 2.5 + 0.004 * r, r)}
        for r in (0, 1)
    ]  # fmt: skip
    fixed = {"seed": 0, "domain_batches": 24, "general_batches": 24, "digest": _h("fixed")}
    _write(run / "summary" / "summary.json", {"base": base_losses, "curve": curve,
                                              "fixed_set": fixed})  # fmt: skip
    # The fabricated records read back through the validator's own explain: same shape.
    rows = {row.hotkey: row for row in explain_state(run / "validator0", 0)}
    assert rows[hotkeys[0]].weight == 1.0 and rows[hotkeys[1]].code == "general_regression"
    return dict(
        url=anvil_node.w3.provider.endpoint_uri,
        registry=registry,
        run=run,
        hotkeys=hotkeys,
        uids=uids,
        digest=digest,
        deltas=deltas,
        tmp=tmp,
        validator_uid=uids[validator.address],
    )


def _point(base: dict, domain: float, general: float, checkpoint_round: int) -> dict:
    return {"domain_loss": domain, "general_loss": general,
            "domain_gain": base["domain_loss"] - domain,
            "general_drift": general - base["general_loss"],
            "checkpoint_round": checkpoint_round}  # fmt: skip


@pytest.fixture(scope="module")
def dashboard(network):
    port = free_port()
    log = network["tmp"] / "dashboard.log"
    cmd = [
        sys.executable,
        "-m",
        "moesaic",
        "dashboard",
        "--rpc",
        network["url"],
        "--registry",
        network["registry"],
        "--run",
        str(network["run"]),
        "--port",
        str(port),
        "--refresh",
        "0",
        "--label",
        "test run",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc, log, timeout=60)
        yield base
    finally:
        stop(proc)  # by its own pid (its session), nothing else


def _chromium(profile: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium missing: run scripts/env.sh as root (apt-get chromium)")
    return chromium(profile, *args, timeout=timeout)


def test_api_state_has_the_chain_and_the_roles(network, dashboard):
    with urllib.request.urlopen(dashboard + "/api/state", timeout=30) as resp:
        snap = json.loads(resp.read())
    assert snap["chain_error"] is None, snap["chain_error"]
    assert snap["chain"]["position"]["round"] == 0
    assert [c["digest"] for c in snap["chain"]["checkpoints"]] == [network["digest"]]
    assert len(snap["dirs"]["validator"]) == 1 and len(snap["dirs"]["miner"]) == 2
    by_round = {r["round"]: r for r in snap["rounds"]}
    assert {c["hotkey"] for c in by_round[0]["commitments"]} == set(network["hotkeys"])
    vector = by_round[0]["weights"][str(network["validator_uid"])]
    # u16 scaled so the largest is 65535, as the chain holds it (0.8 : 0.2)
    assert sorted(vector.values()) == [16384, 65535]
    rows = {row["hotkey"]: row for row in by_round[0]["validators"][0]["rows"]}
    a, b = network["hotkeys"]
    assert rows[a]["ci_low"] == pytest.approx(0.0412)
    assert rows[a]["ci_high"] == pytest.approx(2 * 0.0583 - 0.0412)
    # The run's summary/summary.json: the cumulative curve, network vs solo vs the base.
    assert snap["curve"]["source"] == str(network["run"] / "summary" / "summary.json")
    assert [row["solo"]["domain_loss"] for row in snap["curve"]["curve"]] == pytest.approx(
        [3.1, 3.05]
    )


def test_page_in_headless_chromium(network, dashboard, tmp_path):
    dom = _chromium(tmp_path / "profile-dom", "--dump-dom", dashboard + "/")
    html = dom.stdout.decode()
    assert dom.returncode == 0 and "</html>" in html, dom.stderr.decode()[-2000:]
    a, b = network["hotkeys"]
    assert "moesaic dashboard - test run" in html
    assert "Scores, round 1" in html  # the newest scored round leads the page
    assert "phase <b>merge</b>" in html  # where the chain is now
    assert a in html and b in html
    for reason in REASONS.values():
        assert escape(reason, quote=False) in html  # the DOM serialiser writes > as &gt;
    assert "0.0412" in html and "general_regression" in html
    assert "[0.0412, 0.0754]" in html  # the score's interval: [LCB, mirrored upper end]
    assert "Weights on chain, round 0" in html
    assert ">65535<" in html and ">16384<" in html  # u16 values read from the chain
    assert ">0.8000<" in html and ">0.2000<" in html  # and their shares
    assert network["digest"] in html and network["deltas"] in html
    assert html.count("<svg") >= 6  # interval chart, the cumulative two, three per round
    assert "Held-out domain loss per round" in html and "<polyline" in html
    # The cumulative curve: the original base, the network and the solo line on one fixed set
    assert "Domain loss, fixed held-out set" in html and "General drift from the" in html
    assert "solo: round 1, 3.05" in html and "network: round 1, 3" in html
    assert "original base: round 0, 3.2" in html

    shot = tmp_path / "dashboard.png"
    run = _chromium(
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        dashboard + "/",
    )
    assert run.returncode == 0 and shot.exists(), run.stderr.decode()[-2000:]
    assert shot.stat().st_size > 20_000
    _assert_real_picture(shot, (1280, 2000))
    print(f"screenshot: {shot}")


def _assert_real_picture(path: Path, size: tuple[int, int] | None = None) -> None:
    """Not blank: many colours and a real spread of brightness."""
    from PIL import Image

    if size:
        with Image.open(path) as img:
            assert img.size == size
    assert blank_reason(path) is None, f"{path}: {blank_reason(path)}"


def test_report_writes_non_blank_pngs(network, tmp_path):
    out = tmp_path / "report"
    cmd = [
        sys.executable,
        "-m",
        "moesaic",
        "report",
        "--run",
        str(network["run"]),
        "--rpc",
        network["url"],
        "--registry",
        network["registry"],
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    names = ("loss_per_round.png", "score_distribution.png", "scores_per_round.png")
    for name in (*names, "cumulative_curve.png"):
        assert (out / name).stat().st_size > 10_000
        _assert_real_picture(out / name)
    snap = json.loads((out / "snapshot.json").read_text())
    assert [row["network"]["domain_gain"] for row in snap["curve"]["curve"]] == pytest.approx(
        [0.2, 0.2]
    )
    merges = [m for r in snap["rounds"] for m in r["mergers"]]
    assert sorted(m["merged_domain_mean"] for m in merges) == pytest.approx([2.65, 3.0])
    assert snap["chain"]["checkpoints"][0]["digest"] == network["digest"]
