"""`moesaic validator explain`: why each miner has its score and weight, from recorded state.

rows = explain_state("runs/validator", 3)    # no chain, no store: the round's JSON only
print(format_explain(rows))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from protocol.round.scoring import ExplainRow, Score, explain_rows
from protocol.round.state import RoundStore


def explain_recorded(state: dict) -> list[ExplainRow]:
    """Explain rows from a round's recorded state (its evaluate and score records)."""
    outcomes, scored = state["evaluate"]["outcomes"], state["score"]
    # Fetch rejections carry their own codes (not_revealed, unavailable, bad_signature, ...)
    # into the rows.
    scores = {h: Score(o["value"], o["code"], o["reason"]) for h, o in outcomes.items()}
    weights = dict(zip(scored["weights"]["uids"], scored["weights"]["weights"], strict=True))
    return explain_rows(scored["uids"], scores=scores, averages=scored["averages"], weights=weights)


def explain_state(state_dir: str | Path, r: int) -> list[ExplainRow]:
    """Explain round r from a validator's state directory, without a chain or a store."""
    rounds = RoundStore(state_dir)
    if not rounds.path(r).exists():
        raise FileNotFoundError(f"{rounds.path(r)}: this validator has no record of round {r}")
    state = rounds.load(r)
    if "score" not in state:
        done = [k for k in ("collect", "fetch", "evaluate") if k in state]
        raise ValueError(f"round {r} is not scored yet (steps done: {', '.join(done) or 'none'})")
    return explain_recorded(state)


def format_explain(rows: Sequence[ExplainRow]) -> str:
    """A plain-text table, one line per row: uid, hotkey, score, average, weight, code, reason."""
    header = ("uid", "hotkey", "score", "average", "weight", "code", "reason")
    lines = [header]
    for row in rows:
        uid = "-" if row.uid is None else str(row.uid)
        numbers = (f"{row.score:.4g}", f"{row.average:.4g}", f"{row.weight:.4f}")
        lines.append((uid, row.hotkey, *numbers, row.code, row.reason))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    )
