"""The role run loop's reaction to a failed round: retry, skip to the next, or stop."""

from __future__ import annotations

import pytest

from miner.node import RoundConflict, WrongPhase
from protocol.chain import ChainError, DispatchError
from protocol.round.runtime import after_failure


@pytest.mark.parametrize(
    "error, verdict",
    [
        (ChainError("Unreachable", "rpc down after 4 retries"), "retry"),
        (ChainError("Unconfirmed", "no receipt"), "retry"),
        (ChainError("BadResponse", "not JSON"), "retry"),  # a broken endpoint may heal
        (ChainError("RpcError", "internal error"), "retry"),
        (ChainError("OutOfGas", "membersPage"), "skip"),
        (ChainError("Rejected", "insufficient funds"), "skip"),  # logged each round, alive
        (ChainError("WrongPhase", "commit phase over"), "skip"),
        (ChainError("AlreadySetWeights", "round 3"), "skip"),
        (WrongPhase("round 2's commit phase is over"), "skip"),
        # subtensor: rate limits and an unopened reveal window pass within the round ...
        (DispatchError("SettingWeightsTooFast", "rate limit"), "retry"),
        (DispatchError("CommittingWeightsTooFast", "rate limit"), "retry"),
        (DispatchError("RevealTooEarly", "next epoch"), "retry"),
        # ... every other module error gives the round up, the daemon alive
        (DispatchError("NeuronNoValidatorPermit", "not yet"), "skip"),
        (DispatchError("ExpiredWeightCommit", "window passed"), "skip"),
        (DispatchError("InvalidRevealCommitHashNotMatch", "salt lost"), "skip"),
        (DispatchError("WeightVecLengthIsLow", "min allowed weights"), "skip"),
        (ChainError("PriorityTooLow", "pool"), "retry"),
        (ChainError("InvalidTransaction", "pool: fees"), "skip"),
        (ChainError("SettingWeightsTooFast", "not a dispatch error"), "raise"),
        (ChainError("NotRegistered", "0xabc"), "raise"),  # a human must register the key
        (RoundConflict("state disagrees with the chain"), "raise"),
        (ValueError("bad config"), "raise"),
    ],
)
def test_after_failure(error, verdict):
    assert after_failure(error) == verdict


class _ScriptedRole:
    """A role whose rounds raise the scripted errors in turn, then succeed."""

    def __init__(self, schedule, errors):
        self.schedule, self.errors, self.calls = schedule, list(errors), []

    def run_round(self, r, wait):
        self.calls.append(r)
        if self.errors:
            raise self.errors.pop(0)
        return {"set_weights": {"status": "sent"}}


def test_a_daemon_survives_subtensor_dispatch_errors():
    """RevealTooEarly is retried within the round; NeuronNoValidatorPermit gives the round up
    and the next one runs (the run loop on a fake chain, no sleeping past a few ms)."""
    from types import SimpleNamespace

    from protocol.chain.fake import FakeChain, FakeLedger
    from protocol.config import MetricsConfig, RunConfig
    from protocol.round.runtime import run_rounds
    from protocol.round.schedule import Schedule

    schedule = Schedule()
    chain = FakeChain(FakeLedger(schedule), "validator")
    errors = [
        DispatchError("RevealTooEarly", "next epoch"),
        DispatchError("NeuronNoValidatorPermit", "no permit yet"),
    ]
    role = _ScriptedRole(schedule, errors)
    config = SimpleNamespace(run=RunConfig(rounds=2, poll_s=0.001), metrics=MetricsConfig())
    run_rounds("validator", role, chain, config)
    assert role.calls == [0, 0, 1]  # round 0 retried, then given up; round 1 done

    fatal = _ScriptedRole(schedule, [ChainError("NotRegistered", "0xabc")])
    with pytest.raises(ChainError):
        run_rounds("validator", fatal, chain, config)
