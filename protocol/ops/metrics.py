"""Prometheus metrics for the role processes, served as text on 127.0.0.1:<port>/metrics.

    metrics = RoleMetrics("validator")
    metrics.serve(9101)                       # [metrics] port; 0 = no endpoint
    metrics.round_started(7); metrics.phase("evaluate")
    metrics.observe_record(record)            # what a finished round recorded

Scrape it with `curl -s 127.0.0.1:9101/metrics` or point Prometheus at it. Every metric is
`moesaic_*` and carries the `role` label, so one Prometheus can scrape all roles on a box:

    moesaic_round{role}                         round in progress
    moesaic_phase{role,moesaic_phase}           1 for the current phase (an Enum), 0 for others
    moesaic_rounds_completed_total{role}
    moesaic_tokens_per_second{role}             miner training throughput of the last round
    moesaic_tokens_total{role}                  training tokens, all rounds
    moesaic_loss{role,kind}                     train_first / train_last (miner), base / merged /
                                                best_single (merger, held-out domain loss)
    moesaic_score{role,hotkey}                  validator: this round's score per miner
    moesaic_weight{role,hotkey}                 validator: this round's weight per miner
    moesaic_transfer_bytes_total{role,direction}  bytes uploaded / downloaded through the store
    moesaic_errors_total{role,kind}             failed rounds and rejected submissions by code

Each RoleMetrics has its own CollectorRegistry (not the library's global one), so tests and
several roles in one process never collide. The endpoint binds 127.0.0.1 only: metrics name
hotkeys and are for the operator; expose them further with a reverse proxy if wanted.
"""

from __future__ import annotations

import math

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.parser import text_string_to_metric_families

from protocol.round.schedule import PHASES

# The state before the first round and between rounds (waiting is not a schedule phase).
IDLE = "idle"


class RoleMetrics:
    """The metrics of one role process."""

    def __init__(self, role: str):
        # The *_created series (counter creation times) only double the scrape for no reader.
        disable_created_metrics()
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["role"]
        self._round = Gauge("moesaic_round", "Round in progress", labels, registry=r)
        self._phase = Enum(
            "moesaic_phase",
            "Schedule phase the role is working in",
            labels,
            states=[IDLE, *PHASES],
            registry=r,
        )
        self._completed = Counter("moesaic_rounds_completed", "Rounds finished", labels, registry=r)
        self._tps = Gauge(
            "moesaic_tokens_per_second", "Training tokens/s of the last round", labels, registry=r
        )
        self._tokens = Counter("moesaic_tokens", "Training tokens", labels, registry=r)
        self._loss = Gauge("moesaic_loss", "Loss (nats/token)", [*labels, "kind"], registry=r)
        self._score = Gauge(
            "moesaic_score", "Score this round per miner", [*labels, "hotkey"], registry=r
        )
        self._weight = Gauge(
            "moesaic_weight", "Weight set this round per miner", [*labels, "hotkey"], registry=r
        )
        self._bytes = Counter(
            "moesaic_transfer_bytes", "Bytes through the store", [*labels, "direction"], registry=r
        )
        self._errors = Counter("moesaic_errors", "Errors by kind", [*labels, "kind"], registry=r)
        self._phase.labels(role).state(IDLE)
        self._round.labels(role).set(-1)  # -1 until the first round starts
        self._server = None
        self.port: int | None = None

    # -- endpoint -----------------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> int | None:
        """Start the /metrics endpoint in a daemon thread; port 0 means off. Returns the port."""
        if not port:
            return None
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_address[1]
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def text(self) -> str:
        """The exposition text a scrape returns (for tests and `--dry-run` style checks)."""
        return generate_latest(self.registry).decode()

    # -- the run loop ------------------------------------------------------------------------
    def round_started(self, r: int) -> None:
        self._round.labels(self.role).set(r)

    def phase(self, name: str) -> None:
        """The phase the role works in now (a schedule phase, or "idle")."""
        self._phase.labels(self.role).state(name if name in PHASES else IDLE)

    def error(self, kind: str, n: int = 1) -> None:
        self._errors.labels(self.role, kind).inc(n)

    def transferred(self, direction: str, nbytes: int) -> None:
        if nbytes > 0:
            self._bytes.labels(self.role, direction).inc(nbytes)

    def observe_record(self, record: dict) -> None:
        """Pull the numbers out of what a role's run_round returned (see module doc)."""
        if not isinstance(record, dict):
            return
        self._completed.labels(self.role).inc()
        if self.role == "miner":
            self._miner(record)
        elif self.role == "validator":
            self._validator(record)
        elif self.role == "merger":
            self._merger(record)

    def _loss_value(self, kind: str, value) -> None:
        if _finite(value):
            self._loss.labels(self.role, kind).set(value)

    def _miner(self, record: dict) -> None:
        # The miner's summary: tokens, bytes of the delta, first and last training loss.
        tokens = record.get("tokens")
        if _finite(tokens) and tokens > 0:
            self._tokens.labels(self.role).inc(tokens)
        if _finite(record.get("tokens_per_s")):
            self._tps.labels(self.role).set(record["tokens_per_s"])
        self._loss_value("train_first", record.get("first_loss"))
        self._loss_value("train_last", record.get("last_loss"))
        if _finite(record.get("bytes")):
            self.transferred("upload", int(record["bytes"]))

    def _validator(self, record: dict) -> None:
        fetch = record.get("fetch") or {}
        for got in (fetch.get("fetched") or {}).values():
            if _finite(got.get("size")):
                self.transferred("download", int(got["size"]))
        outcomes = (record.get("evaluate") or {}).get("outcomes") or {}
        # A fresh round replaces the per-miner series: miners that left must not linger.
        self._score.clear()
        self._weight.clear()
        for hotkey, outcome in outcomes.items():
            if _finite(outcome.get("value")):
                self._score.labels(self.role, hotkey).set(outcome["value"])
            code = outcome.get("code")
            if code and code != "ok" and outcome.get("rejection"):
                self.error(f"rejected_{code}")
        score = record.get("score") or {}
        uids = score.get("uids") or {}
        vector = score.get("weights") or {}
        by_uid = dict(zip(vector.get("uids", []), vector.get("weights", []), strict=False))
        for hotkey, uid in uids.items():
            self._weight.labels(self.role, hotkey).set(by_uid.get(uid, 0.0))

    def _merger(self, record: dict) -> None:
        merge = record.get("merge") or {}
        self._loss_value("base", merge.get("base_domain_mean"))
        candidates = merge.get("candidates") or {}
        self._loss_value("merged", (candidates.get("merged") or {}).get("domain_mean"))
        singles = [c.get("domain_mean") for k, c in candidates.items() if k != "merged" and c]
        singles = [x for x in singles if _finite(x)]
        if singles:
            self._loss_value("best_single", min(singles))


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def parse_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of an exposition text as {(name, sorted label pairs): value}; used by tests and
    handy for scripts checking a role from the shell."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


__all__ = ["IDLE", "RoleMetrics", "parse_text"]
