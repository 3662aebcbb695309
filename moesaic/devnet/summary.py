"""The devnet's summary: read back from the chain and the processes' state, then measured.

`summarise` gathers (effectful: chain reads, `moesaic checkpoint pull`, forward passes);
`check` and `format_summary` are pure functions of the summary dict, which is also what
`--json-summary` writes (the file passes 500 lines because the pure readers of one dict,
curve, targets, check and the table, belong next to the one function that builds it):

    {"rounds": [{"round", "checkpoint": {digest, uri} | null, "merge": {decision, reason},
                 "domain_loss", "general_loss", "domain_gain", "general_rise"}],
     "base": {"domain_loss", "general_loss", "params", "bf16_bytes"},
     "curve": [{"round", "network": LINE, "solo": LINE | null}],
     "fixed_set": {"seed", "domain", "general", "domain_batches", "general_batches", "digest"},
     "miners": [{"name", "strategy", "uid", "address", "upload_bytes", "upload_ratio",
                 "rounds": [{"round", "score", "weight", "code", "reason"}]}],
     "final": {"round", "path", "digest", "pulled_digest"} | null, "wall_s", "gates": [...]}

Losses are the mean next-token loss on ONE fixed set of held-out batches (seed 0, independent
of every round's eval seed, the same for every round and every run): the domain's VAL split
(the text the devnet carves into the validators' private held-out sets; no miner trains on it,
whereas the eval-pool cheater trains on the public test split) and the general specs' test
splits: the original base, each round's published checkpoint (pulled from the
store and verified like any user would) and the solo line's checkpoints (solo.py). `curve` reads
across rounds against the original base; a LINE is

    {"domain_loss", "general_loss", "domain_gain", "general_drift", "checkpoint_round"}

where the network's line after round r is the latest checkpoint published in a round <= r (a
round that kept the previous checkpoint carries it; the original base before any), gains and
drifts are against the original base, and checkpoint_round names the checkpoint measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from moesaic.config import load_config
from protocol.chain.evm import EvmChain
from protocol.identity.hashing import sha256_dir
from protocol.moe.evaluate import build_eval_set, mean_loss
from protocol.moe.model import load_model
from protocol.round.lineage import Lineage
from protocol.round.schedule import position
from validator.explain import explain_state

SUMMARY_SEED = 0
SUMMARY_BATCHES = 24
FIXED_DOMAIN_SPLIT = "val"  # the validators' held-out text in the devnet: no miner trains on it
# Each role's recorded steps in protocol order (the live view shows the last one done).
STEPS = {
    "miner": ("trained", "manifest", "committed", "revealed"),
    "validator": ("collect", "fetch", "evaluate", "score", "commit_weights", "set_weights"),
    "merger": ("collect", "fetch", "merge", "publish"),
}


def summarise(
    out: Path, opts, cast, net, base: Path, wall_s: float, gates: list, solo: list | None = None
) -> dict:
    """The summary dict (module doc); `solo`: run_solo's rows, measured on the fixed set too."""
    chain = EvmChain(net.w3, net.registry)
    uid = {m.hotkey.lower(): m.uid for m in chain.members()}
    validator = next(m for m in cast if m.role == "validator")
    settings = load_config(validator.config).validator.settings.evaluation
    found = (chain.checkpoint(r) for r in range(opts.rounds))  # one bounded read per round
    checkpoints = {c.round: c for c in found if c is not None}
    measure = _Measurer(base, load_config(validator.config).task, settings)
    lineage = Lineage(chain, task_base=base, cache_dir=out / "summary" / "checkpoints")
    rounds = []
    for r in range(opts.rounds):
        c = checkpoints.get(r)
        merged = _merger_record(cast, r)
        row = {"round": r, "merge": merged, "checkpoint": None}
        if c is not None:
            row["checkpoint"] = {"digest": c.digest, "uri": c.uri, "block": c.block}
            row.update(measure.losses(lineage.local(c)))
        rounds.append(row)
    merges = [row["merge"] for row in rounds]
    miners = [
        _miner_row(m, validator.own_dir, chain, uid, merges, measure.bf16_bytes)
        for m in cast
        if m.role == "miner"
    ]
    solo_losses = [measure.losses(Path(row["path"])) for row in solo] if solo else None
    summary = {
        "rounds": rounds,
        "base": {**measure.base, "params": measure.params, "bf16_bytes": measure.bf16_bytes},
        "curve": curve(measure.base, rounds, solo_losses),
        "fixed_set": measure.describe(),
        "solo": [{**row, "path": _shown(Path(row["path"]))} for row in solo] if solo else None,
        "miners": miners,
        "final": _pull_final(out, net, checkpoints),
        # As the registry holds them: {round: {validator uid: {miner uid: u16 weight}}}.
        "weights_on_chain": {
            str(r): {str(v): {str(u): w for u, w in held.items()} for v, held in ws.items()}
            for r in range(opts.rounds)
            for ws in [chain.weights(r)]
        },
        "chain": {"rpc": net.url, "registry": net.registry},
        "validators": {m.address: m.name for m in cast if m.role == "validator"},
        "time_split": time_split(
            [_timings(m, r) for r in range(opts.rounds) for m in cast if m.role != "owner"]
        ),
        "general_tolerance": settings.general_tolerance,
        "cumulative_tolerance": load_config(
            validator.config
        ).validator.settings.cumulative_general_tolerance,
        "wall_s": round(wall_s, 1),
        "gates": gates,
    }
    summary["targets"] = targets(summary)
    return summary


class _Measurer:
    """Mean losses of a model directory on the summary's fixed held-out batches."""

    def __init__(self, base: Path, task, settings):
        self.task = task
        # One model load per checkpoint (and per solo round): a loading bar each would bury the
        # summary in the main job's output.
        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(base)
        self.eval_set = build_eval_set(
            tokenizer, task.domain, list(task.general), SUMMARY_SEED,
            seq_len=settings.seq_len, batch_size=settings.batch_size,
            domain_batches=SUMMARY_BATCHES, general_batches=SUMMARY_BATCHES,
            max_tokens=settings.max_tokens, domain_split=FIXED_DOMAIN_SPLIT,
        )  # fmt: skip
        model = self._load(base)
        self.params = sum(p.numel() for p in model.parameters())
        self.bf16_bytes = 2 * self.params
        self.base = self._losses(model)

    def describe(self) -> dict:
        """What the fixed set is: its seed, sources, batch counts and digest (EvalSet.digest)."""
        return {
            "seed": self.eval_set.seed,
            "domain": f"{self.task.domain} ({FIXED_DOMAIN_SPLIT} split)",
            "general": [f"{g} (test split)" for g in self.task.general],
            "domain_batches": len(self.eval_set.domain),
            "general_batches": len(self.eval_set.general),
            "digest": self.eval_set.digest(),
        }

    def losses(self, model_dir: Path) -> dict:
        got = self._losses(self._load(model_dir))
        return {
            **got,
            "domain_gain": self.base["domain_loss"] - got["domain_loss"],
            "general_rise": got["general_loss"] - self.base["general_loss"],
        }

    def _load(self, path: Path):
        return load_model(path, device="cpu")

    def _losses(self, model) -> dict:
        return {
            "domain_loss": mean_loss(model, list(self.eval_set.domain)),
            "general_loss": mean_loss(model, list(self.eval_set.general)),
        }


def _merger_record(cast, r: int) -> dict:
    merger = next(m for m in cast if m.role == "merger")
    path = merger.own_dir / "rounds" / f"{r}.json"
    if not path.is_file():
        return {"decision": None, "reason": "the merger has no record of this round"}
    state = json.loads(path.read_text())
    merged = state.get("merge", {})
    return {
        "decision": merged.get("decision"),
        "reason": merged.get("reason"),
        "included": len(merged.get("included") or []),
        # whose deltas went into the checkpoint (hotkeys), and each miner uid's consensus
        # weight: what the network pays and merges by (protocol.round.consensus)
        "included_hotkeys": [row[0] for row in merged.get("included") or []],
        "consensus": (state.get("collect") or {}).get("consensus") or {},
        "publish": (state.get("publish") or {}).get("status"),
        # the guard's verdict on batches the choice was not made on (merger/core.py guard), and
        # the deltas the validators' rule did not pay this round (never merged)
        "merge_beats_best_single": merged.get("merge_beats_best_single"),
        "excluded": sorted(merged.get("excluded") or {}),
        # each validator's agreement and standing after the round (protocol.round.consensus)
        "validators": {
            v["hotkey"]: {"agreement": v["agreement"], "standing": v["standing_after"]}
            for v in ((state.get("collect") or {}).get("validators") or {}).values()
        },
    }


def _miner_row(m, validator_dir: Path, chain, uid: dict, merges: list, bf16_bytes: int) -> dict:
    """A miner's score and reason (validator0's record), weight (the merger's consensus, what
    the network pays; beside it the plain mean of the validators' weights on chain) per round,
    its bytes uploaded, and for a deleter what it tried to delete."""
    my_uid = uid.get(m.address.lower())
    per_round, uploaded = [], 0
    deletions = {"attempts": 0, "deleted": 0}
    rounds = len(merges)
    for r in range(rounds):
        tried = m.own_dir / "rounds" / f"{r}.deletions.json"
        if tried.is_file():
            report = json.loads(tried.read_text())
            deletions["attempts"] += report["attempts"]
            deletions["deleted"] += report["deleted"]
        state = m.own_dir / "rounds" / f"{r}.json"
        if state.is_file():
            recorded = json.loads(state.read_text())
            uploaded += (recorded.get("trained") or {}).get("bytes") or 0
        shares = []
        for held in chain.weights(r).values():
            total = sum(held.values())
            shares.append(held.get(my_uid, 0) / total if total else 0.0)
        row = {
            "round": r,
            "weight": float(merges[r].get("consensus", {}).get(str(my_uid), 0.0)),
            "weight_mean": sum(shares) / len(shares) if shares else 0.0,
        }
        try:
            mine = [x for x in explain_state(validator_dir, r) if x.uid == my_uid]
        except (FileNotFoundError, ValueError):
            mine = []
        if mine:
            row.update(score=mine[0].score, code=mine[0].code, reason=mine[0].reason)
        else:
            row.update(score=0.0, code="not_scored", reason="validator0 has no record")
        per_round.append(row)
    return {
        "name": m.name,
        "strategy": m.strategy,
        "uid": my_uid,
        "address": m.address,
        "upload_bytes": uploaded,
        "upload_ratio": bf16_bytes * rounds / uploaded if uploaded else None,
        "deletions": deletions if m.strategy == "deleter" else None,
        "rounds": per_round,
    }


def _pull_final(out: Path, net, checkpoints: dict) -> dict | None:
    """`moesaic checkpoint pull` of the latest checkpoint, as a user would run it."""
    if not checkpoints:
        return None
    latest = checkpoints[max(checkpoints)]
    dest = out / "final"
    cmd = [sys.executable, "-m", "moesaic", "checkpoint", "pull", "--rpc", net.url]
    cmd += ["--registry", net.registry, "--latest", "--out", str(dest), "--overwrite", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"round": latest.round, "digest": latest.digest, "path": None,
                "error": done.stderr.strip()[-500:]}  # fmt: skip
    return {
        "round": latest.round,
        "digest": latest.digest,
        "path": _shown(dest),
        "pulled_digest": sha256_dir(dest),
    }


def _shown(path: Path) -> str:
    """The path as a user typed it: relative to the working directory when inside it, so a
    summary committed to the repository names no folder of the machine that wrote it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _timings(m, r: int) -> tuple[str, str | None, dict]:
    """(role, strategy, {step: seconds}) of one process in round r, from its state file."""
    path = m.own_dir / "rounds" / f"{r}.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    return m.role, m.strategy, state.get("timings") or {}


# ----------------------------------------------------------------------------- pure

# Steps that are the work itself; every other step is protocol overhead (chain, storage,
# verification, signing). Lazy and copycat "training" is not work (the copycat's includes
# waiting for someone to copy), so only honest miners' training counts.
TRAINING_STEPS = {("miner", "train")}
EVALUATION_STEPS = {("validator", "evaluate"), ("merger", "merge")}


def time_split(timings: list[tuple[str, str | None, dict]]) -> dict:
    """Process-seconds in training, evaluation and everything else, summed over processes and
    rounds (the processes run in parallel, so this is work, not wall time)."""
    split = {"training_s": 0.0, "evaluation_s": 0.0, "other_s": 0.0}
    for role, strategy, steps in timings:
        for step, seconds in steps.items():
            if (role, step) in TRAINING_STEPS:
                if strategy == "honest":
                    split["training_s"] += seconds
            elif (role, step) in EVALUATION_STEPS:
                split["evaluation_s"] += seconds
            else:
                split["other_s"] += seconds
    total = sum(split.values())
    split["overhead_share"] = split["other_s"] / total if total else None
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in split.items()}


# The evalpool miner does real work on public text, so it earns; with private held-out text it
# must not earn more than honest miners. One devnet run of 16-step rounds moves a miner's weight
# by tens of percent, hence the slack; tests/integration/test_cheats.py measures it paired.
EVALPOOL_SLACK = 1.5
WORKERS = ("honest", "evalpool")  # the miners whose deltas are real training


def _line(base: dict, losses: dict, checkpoint_round: int | None) -> dict:
    """One line's point: its losses, gain and drift against the original base."""
    return {
        "domain_loss": losses["domain_loss"],
        "general_loss": losses["general_loss"],
        "domain_gain": base["domain_loss"] - losses["domain_loss"],
        "general_drift": losses["general_loss"] - base["general_loss"],
        "checkpoint_round": checkpoint_round,
    }


def curve(base: dict, rounds: list[dict], solo: list[dict] | None = None) -> list[dict]:
    """Per round, the network's line and the solo line on the fixed set (module doc). `rounds`:
    the summary's rows (losses where a checkpoint was published); `solo`: the solo line's losses
    after each round, or None when it did not run."""
    if solo is not None and len(solo) != len(rounds):
        raise ValueError(f"the solo line has {len(solo)} rounds, the network {len(rounds)}")
    network = _line(base, base, None)  # before any checkpoint: the original base
    out = []
    for i, row in enumerate(rounds):
        if row.get("checkpoint"):
            network = _line(base, row, row["round"])
        point = {"round": row["round"], "network": network}
        point["solo"] = _line(base, solo[i], row["round"]) if solo is not None else None
        out.append(point)
    return out


def targets(summary: dict) -> dict:
    """Issue 16's devnet targets, measured (pure; from the summary's own rows):
    `improved`: rounds whose checkpoint lowered the fixed set's domain loss below the line's
    previous point (a round that published nothing does not improve it); `honest_paid`: rounds
    in which every honest miner scored above zero; `merge_won`: rounds whose guard found the
    merge better than the best single delta on batches it was not chosen on, of the rounds that
    measured it; `drift`: the final checkpoint's general drift on the fixed set against the
    original base."""
    points = [p["network"] for p in summary.get("curve") or []]
    before = [summary["base"]["domain_loss"]] + [p["domain_loss"] for p in points[:-1]]
    improved = sum(p["domain_loss"] < b for p, b in zip(points, before, strict=True))
    honest = [m for m in summary["miners"] if m["strategy"] == "honest"]
    rounds = [r["round"] for r in summary["rounds"]]
    paid = sum(all(x["score"] > 0 for m in honest for x in m["rounds"] if x["round"] == r)
               for r in rounds)  # fmt: skip
    verdicts = [r["merge"].get("merge_beats_best_single") for r in summary["rounds"]]
    measured = [v for v in verdicts if v is not None]
    return {
        "rounds": len(rounds),
        "improved": improved,
        "honest_paid": paid,
        "merge_won": sum(measured),
        "merge_measured": len(measured),
        "drift": points[-1]["general_drift"] if points else None,
    }


def target_lines(summary: dict) -> list[str]:
    """The targets as the summary prints them."""
    t = summary.get("targets")
    if not t:
        return []
    drift = "n/a" if t["drift"] is None else f"{t['drift']:+.4f}"
    return [
        f"targets: the checkpoint improved the fixed-set domain loss in {t['improved']} of "
        f"{t['rounds']} rounds; every honest miner scored > 0 in {t['honest_paid']} of "
        f"{t['rounds']}; the merge beat the best single delta on unused batches in "
        f"{t['merge_won']} of {t['merge_measured']} guarded rounds; general drift {drift} "
        f"(cumulative tolerance {summary.get('cumulative_tolerance', 'n/a')})",
    ]


def _earned(miner: dict) -> float:
    return sum(x["weight"] for x in miner["rounds"])


def check(summary: dict) -> list[str]:
    """What the network failed to do (empty: it did its job)."""
    failures = []
    published = [r for r in summary["rounds"] if r.get("checkpoint")]
    # The network's line at the end, on the fixed set (the final checkpoint against the
    # original base); summaries written before the curve existed carry the same numbers.
    end = (summary.get("curve") or [{}])[-1].get("network") or (published or [{}])[-1]
    if not published:
        failures.append("no merged checkpoint was published")
    elif end["domain_gain"] <= 0:
        failures.append(
            f"the final checkpoint did not improve the domain loss on the fixed held-out set "
            f"over the original base (gain {end['domain_gain']:+.4f} nats)"
        )
    # Each checkpoint's rise is measured against the ORIGINAL base: the validators' cumulative
    # tolerance bounds it (each round's own step is bounded by the per-round one, which the
    # validators and the merger's guard enforce on the round's base).
    tolerance = summary.get("cumulative_tolerance", summary["general_tolerance"])
    for r in published:
        if r["general_rise"] > tolerance:
            failures.append(
                f"round {r['round']}: general loss rose {r['general_rise']:+.4f} nats over the "
                f"original base (cumulative tolerance {tolerance})"
            )
    best_honest = max(
        (_earned(m) for m in summary["miners"] if m["strategy"] == "honest"), default=0.0
    )
    for m in summary["miners"]:
        if m["strategy"] == "evalpool" and _earned(m) > EVALPOOL_SLACK * best_honest:
            failures.append(
                f"{m['name']} (evalpool) earned {_earned(m):.3f}, more than {EVALPOOL_SLACK} x "
                f"the best honest miner's {best_honest:.3f}: the scoring data leaks"
            )
        elif m["strategy"] not in WORKERS:
            paid = [x["round"] for x in m["rounds"] if x["weight"] > 0]
            if paid:
                failures.append(f"{m['name']} ({m['strategy']}) earned weight in rounds {paid}")
        if (m.get("deletions") or {}).get("deleted"):
            failures.append(f"{m['name']} deleted {m['deletions']['deleted']} rivals' objects")
    paid_for_work = {m["address"].lower() for m in summary["miners"] if m["strategy"] in WORKERS}
    for r in summary["rounds"]:
        smuggled = [
            h for h in r["merge"].get("included_hotkeys") or [] if h.lower() not in paid_for_work
        ]
        if smuggled:
            failures.append(f"round {r['round']}: cheaters' deltas were merged: {smuggled}")
    final = summary.get("final")
    if final is not None and final.get("pulled_digest") != final["digest"]:
        failures.append(f"checkpoint pull did not verify: {final.get('error', 'digest differs')}")
    return failures


def _agreement(value: float | None) -> str:
    """A validator's agreement, or why it has none (it set no weights that round)."""
    return "did not vote" if value is None else f"{value:.2f}"


def format_summary(summary: dict) -> str:
    """The terminal table."""
    lines = ["", "== moesaic devnet summary =="]
    b = summary["base"]
    lines.append(
        f"base: domain loss {b['domain_loss']:.4f}, general loss {b['general_loss']:.4f}, "
        f"{b['params']:,} params ({b['bf16_bytes']:,} bytes in bf16)"
    )
    lines.append("")
    lines.append("round  checkpoint        domain loss (gain)     general loss (rise)   merge")
    for r in summary["rounds"]:
        m = r["merge"]
        merge = f"{m.get('decision')}: {m.get('reason') or ''}"[:60]
        if r.get("checkpoint"):
            lines.append(
                f"{r['round']:>5}  {r['checkpoint']['digest'][:16]}  "
                f"{r['domain_loss']:.4f} ({r['domain_gain']:+.4f})     "
                f"{r['general_loss']:.4f} ({r['general_rise']:+.4f})    {merge}"
            )
        else:
            lines.append(f"{r['round']:>5}  {'(none)':16}  {'':21}  {'':20}  {merge}")
    lines += curve_lines(summary)
    lines += target_lines(summary)
    lines.append("")
    rounds = len(summary["rounds"])
    head = "miner        strategy      uid  " + "  ".join(
        f"r{i} score/weight  " for i in range(rounds)
    )
    lines.append(head + "upload (x smaller than bf16 model)  last reason")
    for m in summary["miners"]:
        cells = "  ".join(f"{x['score']:7.4f}/{x['weight']:5.3f}  " for x in m["rounds"])
        ratio = f"{m['upload_ratio']:.0f}x" if m["upload_ratio"] else "-"
        last = m["rounds"][-1] if m["rounds"] else {}
        reason = f"{last.get('code', '')}: {last.get('reason', '')}"[:70]
        lines.append(
            f"{m['name']:<12} {m['strategy']:<12}  {m['uid']!s:>3}  {cells}"
            f"{m['upload_bytes']:>10,} B ({ratio:>6})  {reason}"
        )
    for m in summary["miners"]:
        if m.get("deletions"):
            d = m["deletions"]
            lines.append(f"{m['name']}: tried to delete {d['attempts']} rivals' objects, "
                         f"{d['deleted']} deleted")  # fmt: skip
    last = summary["rounds"][-1]["merge"].get("validators") if summary["rounds"] else None
    names = {a.lower(): n for a, n in (summary.get("validators") or {}).items()}
    if last:
        lines.append("validator standing after the last round (agreement with consensus): " + ", ".join(
            f"{names.get(h.lower(), h[:10])} {v['standing']:.2f} ({_agreement(v['agreement'])})"
            for h, v in last.items()
        ))  # fmt: skip
    final = summary.get("final")
    lines.append("")
    if final:
        lines.append(f"final checkpoint: round {final['round']}, {final.get('path')}")
        lines.append(f"  digest {final['digest']} (pulled: {final.get('pulled_digest')})")
    else:
        lines.append("final checkpoint: none published")
    t = summary.get("time_split") or {}
    if t.get("overhead_share") is not None:
        lines.append(
            f"work: training {t['training_s']:.1f} s, evaluation {t['evaluation_s']:.1f} s, "
            f"chain/storage/verification {t['other_s']:.1f} s "
            f"({t['overhead_share']:.1%} outside training and evaluation; process-seconds)"
        )
    lines.append(f"wall time {summary['wall_s']:.0f} s")
    return "\n".join(lines)


def curve_lines(summary: dict) -> list[str]:
    """The network-vs-solo table: per round, each line's domain loss, domain gain and general
    drift against the original base, on the fixed held-out set (empty without a curve)."""
    rows = summary.get("curve") or []
    if not rows:
        return []
    fixed, b = summary.get("fixed_set") or {}, summary["base"]
    lines = [
        "",
        f"network vs solo on the fixed held-out set (seed {fixed.get('seed')}, "
        f"{fixed.get('domain_batches')} domain + {fixed.get('general_batches')} general batches, "
        f"digest {str(fixed.get('digest'))[:12]}), against the original base "
        f"(domain {b['domain_loss']:.4f}, general {b['general_loss']:.4f}):",
        "round  network: domain loss  gain     general drift  (checkpoint)   "
        "solo: domain loss  gain     general drift",
    ]

    def cells(line: dict | None) -> str:
        if line is None:
            return f"{'(not run)':>17}  {'':7}  {'':13}"
        return (f"{line['domain_loss']:>17.4f}  {line['domain_gain']:+.4f}  "
                f"{line['general_drift']:>+13.4f}")  # fmt: skip

    for row in rows:
        net = row["network"]
        which = "base" if net["checkpoint_round"] is None else f"r{net['checkpoint_round']}"
        lines.append(
            f"{row['round']:>5}  {cells(net)}  {'(' + which + ')':<14} {cells(row.get('solo'))}"
        )
    return lines


def live_line(cast, net) -> str:
    """One line of the live view: block, round and phase, each process's progress."""
    head = net.w3.eth.block_number
    pos = position(net.schedule, head)
    where = f"round {pos.round} {pos.phase}" if pos else "before round 0"
    r = pos.round if pos else 0
    parts = []
    for m in cast:
        if m.role == "owner":
            continue
        path = m.own_dir / "rounds" / f"{r}.json"
        done = "-"
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except ValueError:  # never half-written (atomic), but a read can race a replace
                state = {}
            done = next((s for s in reversed(STEPS[m.role]) if state.get(s)), "-")
        parts.append(f"{m.name}:{done}")
    return f"block {head} {where} | " + " ".join(parts)
