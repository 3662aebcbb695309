"""One snapshot of a run: the chain (schedule, members, commitments, weights, checkpoints) and
the roles' state directories, as plain JSON-able data for the page, the API and the report.

State directories hold `rounds/<r>.json` per round (protocol.round.state, every role).
Which role wrote a directory is read from the records themselves, so `--run runs/devnet` finds
every role below it without naming them:

    miner      {"trained": {...}, "committed": {...}, ...}
    validator  {"collect": {"entries": [...]}, "evaluate": {...}, "score": {...}, ...}
    merger     {"collect": {"accepted": [...]}, "merge": {...}, "publish": {...}}

A directory or record that cannot be read is reported in `problems`, never fatal: a dashboard
must keep showing what it can while a role is mid-write or a chain node is down.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protocol.chain import recent_checkpoints
from protocol.round.schedule import position

ROLES = ("miner", "validator", "merger")
MAX_ROUNDS = 24  # rounds read from the chain per snapshot: the page stays fast on long runs


@dataclass
class RunDirs:
    """State directories by role."""

    miner: list[Path] = field(default_factory=list)
    validator: list[Path] = field(default_factory=list)
    merger: list[Path] = field(default_factory=list)

    def all(self) -> list[tuple[str, Path]]:
        return [(role, d) for role in ROLES for d in getattr(self, role)]


def round_files(state_dir: Path) -> dict[int, Path]:
    """{round: file} of a state directory's rounds/<r>.json."""
    folder = Path(state_dir) / "rounds"
    return {int(p.stem): p for p in folder.glob("*.json") if p.stem.isdigit()}


def role_of(record: dict) -> str | None:
    """Which role wrote a round record (module doc), or None for something else."""
    if "trained" in record or "committed" in record:
        return "miner"
    collect = record.get("collect")
    collect = collect if isinstance(collect, dict) else {}
    if "accepted" in collect or "merge" in record:
        return "merger"
    if "entries" in collect or "score" in record:
        return "validator"
    return None


def discover(root: str | Path, depth: int = 3) -> RunDirs:
    """Every role state directory at or below `root` (up to `depth` levels), by role."""
    found = RunDirs()
    root = Path(root)
    frontier = [root]
    for _ in range(depth + 1):
        following = []
        for d in frontier:
            role = _dir_role(d)
            if role:
                getattr(found, role).append(d)
                continue  # a role's own subfolders (artifacts, checkpoints) are not roles
            following += sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
        frontier = following
    return found


def _dir_role(d: Path) -> str | None:
    for _r, path in sorted(round_files(d).items()):
        try:
            role = role_of(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if role:
            return role
    return None


def merge_dirs(*dirs: RunDirs) -> RunDirs:
    out = RunDirs()
    for d in dirs:
        for role, path in d.all():
            paths = getattr(out, role)
            if path.resolve() not in {p.resolve() for p in paths}:
                paths.append(path)
    return out


def _load(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({e.__class__.__name__})")
        return None
    return data if isinstance(data, dict) else None


def _num(x) -> float | None:
    """A finite float, or None (JSON has no inf/nan the page could show meaningfully)."""
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


# ----------------------------------------------------------------------------- per role


def validator_round(record: dict) -> dict:
    """A validator's round: its rows (score, interval, reason, weight per miner) and steps."""
    steps = [
        s
        for s in ("collect", "fetch", "evaluate", "score", "commit_weights", "set_weights")
        if s in record
    ]
    out: dict = {"steps": steps, "rows": [], "weights_status": None, "eval_seed": None}
    evaluate, score = record.get("evaluate") or {}, record.get("score") or {}
    out["eval_seed"] = evaluate.get("seed")
    out["eval_set_digest"] = evaluate.get("eval_set_digest")
    out["weights_status"] = (record.get("set_weights") or {}).get("status")
    outcomes = evaluate.get("outcomes") or {}
    uids = score.get("uids") or {}
    vector = score.get("weights") or {}
    by_uid = dict(zip(vector.get("uids", []), vector.get("weights", []), strict=False))
    averages = score.get("averages") or {}
    for hotkey in sorted(set(outcomes) | set(uids)):
        o = outcomes.get(hotkey) or {}
        mean, lcb = _num(o.get("domain_mean")), _num(o.get("domain_lcb"))
        uid = uids.get(hotkey)
        out["rows"].append(
            {
                "hotkey": hotkey,
                "uid": uid,
                "score": _num(o.get("value")) or 0.0,
                "code": o.get("code") or "no_submission",
                "reason": o.get("reason") or "no commitment evaluated this round",
                "domain_mean": mean,
                "domain_lcb": lcb,
                # The score is a one-sided Student-t lower bound; its mirror image around the mean
                # is the upper end of the symmetric interval with the same half-width.
                "ci_low": lcb,
                "ci_high": 2 * mean - lcb if mean is not None and lcb is not None else None,
                "general_mean": _num(o.get("general_mean")),
                "average": _num(averages.get(hotkey)) or 0.0,
                "weight": by_uid.get(uid, 0.0) if uid is not None else 0.0,
            }
        )
    out["rows"].sort(key=lambda row: (-row["weight"], -row["score"], row["hotkey"]))
    return out


def merger_round(record: dict) -> dict:
    merge, publish = record.get("merge") or {}, record.get("publish") or {}
    candidates = {
        name: {
            "domain_mean": _num(c.get("domain_mean")),
            "general_rise": _num(c.get("general_rise")),
        }
        for name, c in (merge.get("candidates") or {}).items()
        if isinstance(c, dict)
    }
    singles = [
        c["domain_mean"] for n, c in candidates.items() if n != "merged" and c["domain_mean"]
    ]
    return {
        "steps": [s for s in ("collect", "fetch", "merge", "publish") if s in record],
        "accepted": [a.get("hotkey") for a in (record.get("collect") or {}).get("accepted", [])],
        "decision": merge.get("decision"),
        "reason": merge.get("reason"),
        "base_domain_mean": _num(merge.get("base_domain_mean")),
        "merged_domain_mean": (candidates.get("merged") or {}).get("domain_mean"),
        "best_single_domain_mean": min(singles) if singles else None,
        "candidates": candidates,
        "included": merge.get("included") or [],
        "publish_status": publish.get("status"),
        "checkpoint_digest": publish.get("digest"),
    }


def miner_round(record: dict) -> dict:
    trained = record.get("trained") or {}
    return {
        "tokens": trained.get("tokens"),
        "first_loss": _num(trained.get("first_loss")),
        "last_loss": _num(trained.get("last_loss")),
        "bytes": trained.get("bytes"),
        "delta_sha256": trained.get("sha256"),
        "manifest_digest": (record.get("manifest") or {}).get("digest"),
        "commit_block": (record.get("committed") or {}).get("block"),
        "hotkey": ((trained.get("meta") or {}).get("hotkey")),
    }


READERS = {"miner": miner_round, "validator": validator_round, "merger": merger_round}


def read_dirs(dirs: RunDirs, problems: list[str]) -> dict[int, dict]:
    """{round: {"validators": [...], "mergers": [...], "miners": [...]}} from the state dirs."""
    rounds: dict[int, dict] = {}
    for role, d in dirs.all():
        for r, path in sorted(round_files(d).items()):
            record = _load(path, problems)
            if record is None:
                continue
            entry = rounds.setdefault(r, {"validators": [], "mergers": [], "miners": []})
            view = READERS[role](record)
            view["dir"] = str(d)
            entry[role + "s"].append(view)
    return rounds


# ----------------------------------------------------------------------------- the chain


def read_chain(chain, rounds: list[int] | None = None, store=None) -> dict:
    """The chain's side: block, schedule and position, members, and per round commitments and
    weights (the current round and up to MAX_ROUNDS before it), checkpoints (with whether the
    store holds each one's manifest when a store is given)."""
    block = chain.block()
    schedule = chain.schedule()
    pos = position(schedule, block)
    current = pos.round if pos else None
    wanted = set(rounds or [])
    if current is not None:
        wanted |= set(range(max(0, current - MAX_ROUNDS + 1), current + 1))
    out = {
        "block": block,
        "schedule": asdict(schedule),
        "position": asdict(pos) if pos else None,
        "members": [asdict(m) for m in chain.members()],
        "rounds": {},
        "checkpoints": [],
    }
    for r in sorted(wanted):
        commitments = [asdict(c) for c in chain.commitments(r)]
        weights = {
            str(v): {str(u): w for u, w in sorted(ws.items())}
            for v, ws in sorted(chain.weights(r).items())
        }
        out["rounds"][r] = {"commitments": commitments, "weights": weights}
    for c in recent_checkpoints(chain, MAX_ROUNDS):
        item = asdict(c)
        item["in_store"] = _in_store(store, c.uri) if store is not None else None
        out["checkpoints"].append(item)
    return out


def _in_store(store, uri: str) -> bool | None:
    """Whether the store holds the checkpoint's manifest object (its sha256 ends the uri)."""
    found = re.findall(r"[0-9a-f]{64}", uri.lower())
    if not found:
        return None
    try:
        return bool(store.exists(found[-1]))
    except Exception:  # a store being down is shown as "unknown", not an error page
        return None


# ----------------------------------------------------------------------------- the curve

SUMMARY_FILES = ("summary/summary.json", "summary.json")  # in a run dir: moesaic devnet writes both


def read_curve(sources: list[str | Path], problems: list[str] | None = None) -> dict | None:
    """The cumulative curve of a devnet summary (moesaic.devnet.summary: the original base, and
    per round the network's and the solo line's losses on one fixed held-out set), from the
    first source that has one: a summary JSON file, or a run directory holding one
    (SUMMARY_FILES). None when none has a curve (a run still going, or not a devnet)."""
    problems = [] if problems is None else problems
    for source in map(Path, sources):
        files = [source] if source.is_file() else [source / f for f in SUMMARY_FILES]
        for path in files:
            if not path.is_file():
                continue
            doc = _load(path, problems)
            if doc and isinstance(doc.get("curve"), list) and isinstance(doc.get("base"), dict):
                return {
                    "source": str(path),
                    "base": doc["base"],
                    "curve": doc["curve"],
                    "fixed_set": doc.get("fixed_set") or {},
                }
    return None


def snapshot(
    chain=None, dirs: RunDirs | None = None, store=None, label: str = "", curve: dict | None = None
) -> dict:
    """Everything the page shows, as one JSON-able dict (also served at /api/state); `curve`:
    read_curve's, when the run has one."""
    problems: list[str] = []
    by_round = read_dirs(dirs or RunDirs(), problems)
    chain_view, chain_error = None, None
    if chain is not None:
        try:
            chain_view = read_chain(chain, sorted(by_round), store)
        except Exception as e:  # the node may be restarting: show the state dirs meanwhile
            chain_error = f"{e.__class__.__name__}: {e}"
    rounds = set(by_round) | set((chain_view or {}).get("rounds", {}))
    table = []
    for r in sorted(rounds, reverse=True):
        entry = {"round": r, **by_round.get(r, {"validators": [], "mergers": [], "miners": []})}
        entry.update((chain_view or {}).get("rounds", {}).get(r, {}))
        table.append(entry)
    return {
        "label": label,
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "chain": {k: v for k, v in (chain_view or {}).items() if k != "rounds"} or None,
        "chain_error": chain_error,
        "dirs": {role: [str(p) for p in getattr(dirs or RunDirs(), role)] for role in ROLES},
        "rounds": table,
        "curve": curve,
        "problems": problems,
    }


__all__ = [
    "RunDirs",
    "discover",
    "merge_dirs",
    "read_chain",
    "read_curve",
    "read_dirs",
    "role_of",
    "round_files",
    "snapshot",
]
