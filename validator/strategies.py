"""Dishonest validator behaviours, for tests and the devnet: what a validator sets as weights.

A validator computes its weights honestly (validator.node score step), then its configured
strategy (ValidatorSettings.strategy) decides what it commits and reveals:

    uids, weights = strategy_weights(settings, chain, hotkey, r, uids, weights)

- `honest` (the default): the computed weights, unchanged.
- `colluding`: all weight to one miner, `collude_with` (a hotkey), whatever it scored: the
  attack protocol.round.consensus clips to zero while the colluders hold under half of the
  validators' standing. A `collude_with` that is not registered leaves nothing to set.
- `copier`: evaluates nothing (validator.node records `not_evaluated` for every fetched
  delta: the compute it saves is the attack's profit) and sets the most recent weights visible on chain from
  another validator (`copy_from`, or the lowest uid that has any), looking back COPY_LOOKBACK
  rounds from r - 1: with weights committed before they are revealed, the previous round's
  are the newest it can see. It loses standing whenever the miners' scores move.

The choices are pure functions over plain data; strategy_weights is the thin shell that reads
the chain for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protocol.identity.keys import normalise

HONEST, COLLUDING, COPIER = "honest", "colluding", "copier"
STRATEGIES = (HONEST, COLLUDING, COPIER)
COPY_LOOKBACK = 8  # earlier rounds a copier searches for another validator's weights

Vector = tuple[list[int], list[float]]


def colluding_weights(members: Sequence, collude_with: str) -> Vector:
    """All weight to the member whose hotkey is `collude_with`; ([], []) if none is."""
    target = normalise(collude_with)
    uids = [m.uid for m in members if normalise(m.hotkey) == target]
    return (uids[:1], [1.0]) if uids else ([], [])


def copied_weights(
    history: Sequence[tuple[int, Mapping[int, Mapping[int, int]]]],
    own_uid: int,
    source_uid: int | None,
) -> Vector:
    """The newest weights in `history` ([(round, {validator uid: {miner uid: w}})], newest
    first) set by `source_uid` (or by the lowest uid but one's own when None), normalised to
    sum 1, uids ascending; ([], []) if there are none."""
    for _, by_validator in history:
        candidates = sorted(v for v in by_validator if v != own_uid)
        if source_uid is not None:
            candidates = [v for v in candidates if v == source_uid]
        for v in candidates:
            row = {u: w for u, w in by_validator[v].items() if w > 0}
            total = sum(row.values())
            if total > 0:
                uids = sorted(row)
                return uids, [row[u] / total for u in uids]
    return [], []


def strategy_weights(
    settings, chain, hotkey: str, r: int, uids: list[int], weights: list[float]
) -> Vector:
    """(uids, weights) this validator sets for round r under `settings.strategy` (module doc).

    `uids, weights` are the honestly computed ones; `chain` is read only for the dishonest
    strategies (members, earlier rounds' weights).
    """
    if settings.strategy == HONEST:
        return list(uids), list(weights)
    members = chain.members()
    if settings.strategy == COLLUDING:
        return colluding_weights(members, settings.collude_with)
    uid_of = {normalise(m.hotkey): m.uid for m in members}
    own = uid_of.get(normalise(hotkey), -1)
    source = uid_of.get(normalise(settings.copy_from), -2) if settings.copy_from else None
    history = [(q, chain.weights(q)) for q in range(r - 1, max(-1, r - 1 - COPY_LOOKBACK), -1)]
    return copied_weights(history, own, source)
