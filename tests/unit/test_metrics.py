"""The Prometheus endpoint: scraped over HTTP on 127.0.0.1 at a port the test chose, parsed,
and checked against what the role did; and the run loop keeps it current while a round runs."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from moesaic.config import from_dict
from protocol.ops.metrics import RoleMetrics, parse_text
from protocol.round.schedule import Schedule, phase_bounds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse_text(resp.read().decode())


def _get(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def served():
    started = []

    def serve(role: str) -> tuple[RoleMetrics, int]:
        metrics, port = RoleMetrics(role), _free_port()
        assert metrics.serve(port) == port
        started.append(metrics)
        return metrics, port

    yield serve
    for m in started:
        m.close()


def test_validator_metrics_scraped_over_http(served):
    metrics, port = served("validator")
    before = _scrape(port)
    assert _get(before, "moesaic_round", role="validator") == -1
    assert _get(before, "moesaic_phase", role="validator", moesaic_phase="idle") == 1
    metrics.round_started(7)
    metrics.phase("evaluate")
    record = {
        "fetch": {"fetched": {"0xA": {"size": 1000}, "0xB": {"size": 24}}, "rejected": {}},
        "evaluate": {
            "outcomes": {
                "0xA": {"value": 0.25, "code": "ok", "reason": "r", "rejection": None},
                "0xB": {"value": 0.0, "code": "duplicate", "reason": "r", "rejection": None},
                "0xC": {"value": 0.0, "code": "bad_signature", "reason": "r", "rejection": "x"},
            }
        },
        "score": {"uids": {"0xA": 1, "0xB": 2}, "weights": {"uids": [1], "weights": [1.0]}},
    }
    metrics.observe_record(record)
    s = _scrape(port)
    assert _get(s, "moesaic_round", role="validator") == 7
    assert _get(s, "moesaic_phase", role="validator", moesaic_phase="evaluate") == 1
    assert _get(s, "moesaic_phase", role="validator", moesaic_phase="idle") == 0
    assert _get(s, "moesaic_score", role="validator", hotkey="0xA") == 0.25
    assert _get(s, "moesaic_weight", role="validator", hotkey="0xA") == 1.0
    assert _get(s, "moesaic_weight", role="validator", hotkey="0xB") == 0.0
    assert _get(s, "moesaic_transfer_bytes_total", role="validator", direction="download") == 1024
    assert _get(s, "moesaic_errors_total", role="validator", kind="rejected_bad_signature") == 1
    assert _get(s, "moesaic_rounds_completed_total", role="validator") == 1
    # The next round's scores replace this round's: a miner that left must not linger.
    metrics.observe_record({"evaluate": {"outcomes": {"0xB": {"value": 0.5, "code": "ok"}}}})
    s = _scrape(port)
    assert ("moesaic_score", (("hotkey", "0xA"), ("role", "validator"))) not in s
    assert _get(s, "moesaic_score", role="validator", hotkey="0xB") == 0.5


def test_miner_and_merger_metrics(served):
    miner, port = served("miner")
    summary = {
        "tokens": 4096,
        "bytes": 5000,
        "first_loss": 3.5,
        "last_loss": 2.25,
        "tokens_per_s": 812.5,
    }
    miner.observe_record(summary)
    miner.observe_record(summary)
    s = _scrape(port)
    assert _get(s, "moesaic_tokens_total", role="miner") == 8192
    assert _get(s, "moesaic_tokens_per_second", role="miner") == 812.5
    assert _get(s, "moesaic_loss", role="miner", kind="train_last") == 2.25
    assert _get(s, "moesaic_transfer_bytes_total", role="miner", direction="upload") == 10000
    merger, port = served("merger")
    merger.observe_record(
        {
            "merge": {
                "base_domain_mean": 3.0,
                "candidates": {
                    "merged": {"domain_mean": 2.5},
                    "0xA": {"domain_mean": 2.75},
                    "0xB": {"domain_mean": float("inf")},
                },
            }
        }
    )
    s = _scrape(port)
    assert _get(s, "moesaic_loss", role="merger", kind="base") == 3.0
    assert _get(s, "moesaic_loss", role="merger", kind="merged") == 2.5
    assert _get(s, "moesaic_loss", role="merger", kind="best_single") == 2.75


def test_port_zero_is_off_and_close_stops_serving():
    metrics = RoleMetrics("miner")
    assert metrics.serve(0) is None and metrics.port is None
    port = _free_port()
    metrics.serve(port)
    assert _scrape(port)
    metrics.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_port_validated():
    assert from_dict({"metrics": {"port": 9100}}).metrics.port == 9100
    assert from_dict({}).metrics.port == 0
    with pytest.raises(ValueError, match=r"\[metrics\] port"):
        from_dict({"metrics": {"port": 70000}})
    with pytest.raises(ValueError, match="unknown key 'prot'"):
        from_dict({"metrics": {"prot": 1}})


class _Chain:
    def __init__(self, block: int):
        self.height = block

    def block(self) -> int:
        return self.height


class _Node:
    """A role whose round waits for the weights phase, scraping its own endpoint meanwhile."""

    def __init__(self, schedule, chain, port):
        self.schedule, self.chain, self.port, self.seen = schedule, chain, port, []

    def run_round(self, r, wait):
        self.seen.append(_scrape(self.port))
        target = phase_bounds(self.schedule, r, "weights")[0]
        self.chain.height = target  # the chain moved on while we waited
        wait(target)
        self.seen.append(_scrape(self.port))
        return {"score": {"uids": {}, "weights": {"uids": [], "weights": []}}}


def test_run_loop_serves_round_and_phase_while_running():
    from protocol.round.runtime import run_rounds

    schedule = Schedule(start_block=10, train=5, commit=5, reveal=1, evaluate=2, weights=4, merge=2)
    chain = _Chain(block=12)  # round 0, train phase
    port = _free_port()
    config = from_dict({"metrics": {"port": port}, "run": {"rounds": 1, "poll_s": 0.01}})
    node = _Node(schedule, chain, port)
    run_rounds("validator", node, chain, config)
    first, later = node.seen
    assert _get(first, "moesaic_round", role="validator") == 0
    assert _get(first, "moesaic_phase", role="validator", moesaic_phase="train") == 1
    assert _get(later, "moesaic_phase", role="validator", moesaic_phase="weights") == 1
    with pytest.raises(urllib.error.URLError):  # the loop closed its endpoint on the way out
        _scrape(port)
