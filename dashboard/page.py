"""The dashboard page: a snapshot (dashboard.state) rendered as one self-contained HTML document.

Sections, top to bottom: where the chain is (block, round, phase), the latest scored round per
validator (every miner's score, interval, moving average, weight and the reason), the weights
on chain, the cumulative curve (the network's checkpoints and the solo line against the original
base on one fixed held-out set, once a devnet summary has it), loss and score plots per round,
the checkpoint history with digests, every round at a glance, and the members. Everything from the outside (hotkeys, reasons, uris) is escaped.
"""

from __future__ import annotations

from html import escape

from dashboard.svg import interval_chart, line_chart

PHASES = ("train", "commit", "reveal", "evaluate", "weights", "merge")

CSS = """
body { font-family: sans-serif; margin: 18px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px 0; } h2 { font-size: 16px; margin: 22px 0 6px 0; }
table { border-collapse: collapse; background: #fff; font-size: 12px; }
td, th { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eef; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.mono { font-family: monospace; font-size: 11px; word-break: break-all; }
.bad { background: #fdd; padding: 6px; border: 1px solid #c99; margin: 6px 0; }
.phases span { display: inline-block; padding: 3px 10px; margin-right: 2px; background: #ddd; }
.phases span.now { background: #2a7; color: #fff; font-weight: bold; }
.code-ok { color: #070; } .code-other { color: #a00; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
"""


def render(snap: dict, refresh_s: int = 0) -> str:
    """The page for one snapshot; `refresh_s` > 0 reloads it that often."""
    title = "moesaic dashboard" + (f" - {snap['label']}" if snap.get("label") else "")
    head = f"<meta charset='utf-8'><title>{escape(title)}</title><style>{CSS}</style>"
    if refresh_s > 0:
        head += f"<meta http-equiv='refresh' content='{int(refresh_s)}'>"
    body = [f"<h1>{escape(title)}</h1>", _status(snap)]
    body += _problems(snap)
    body += _latest_scores(snap)
    body += _weights(snap)
    body += _plots(snap)
    body += _checkpoints(snap)
    body += _rounds(snap)
    body += _members(snap)
    body.append(f"<p style='color:#777'>generated {escape(snap.get('generated_at', ''))}</p>")
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>"


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are already-escaped HTML; columns in `numeric` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = "".join(
            f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def _status(snap: dict) -> str:
    chain = snap.get("chain")
    if not chain:
        return "<p id='status'>chain: not connected (state directories only)</p>"
    pos = chain.get("position")
    if pos is None:
        where = f"before round 0 (starts at block {chain['schedule']['start_block']})"
        phase = None
    else:
        where = f"round <b id='current-round'>{pos['round']}</b>, phase <b>{pos['phase']}</b>"
        where += f" (blocks {pos['phase_start']}..{pos['phase_end']})"
        phase = pos["phase"]
    bar = "".join(
        f"<span class='{'now' if p == phase else ''}'>{p} {chain['schedule'][p]}</span>"
        for p in PHASES
    )
    return (
        f"<p id='status'>block <b>{chain['block']}</b>: {where}</p><div class='phases'>{bar}</div>"
    )


def _problems(snap: dict) -> list[str]:
    out = []
    if snap.get("chain_error"):
        out.append(f"<div class='bad'>chain unreachable: {escape(snap['chain_error'])}</div>")
    for p in snap.get("problems", [])[:20]:
        out.append(f"<div class='bad'>{escape(p)}</div>")
    return out


def _latest_scores(snap: dict) -> list[str]:
    """The newest round some validator has scored: one table and interval chart per validator."""
    scored = [r for r in snap["rounds"] if any(v["rows"] for v in r["validators"])]
    if not scored:
        return ["<h2>Scores</h2><p>no validator has scored a round yet</p>"]
    rnd = scored[0]
    out = [f"<h2 id='scores'>Scores, round {rnd['round']}</h2>"]
    for v in rnd["validators"]:
        status = v.get("weights_status") or "not sent yet"
        out.append(
            f"<p>validator state <span class='mono'>{escape(v['dir'])}</span>; weights: "
            f"{escape(status)}; eval set <span class='mono'>"
            f"{escape(str(v.get('eval_set_digest') or '-'))}</span></p>"
        )
        rows = []
        for row in v["rows"]:
            cls = "code-ok" if row["code"] == "ok" else "code-other"
            interval = (
                f"[{_f(row['ci_low'])}, {_f(row['ci_high'])}]" if row["ci_low"] is not None else "-"
            )
            rows.append(
                [
                    "-" if row["uid"] is None else str(row["uid"]),
                    f"<span class='mono'>{escape(row['hotkey'])}</span>",
                    _f(row["score"]),
                    _f(row["domain_mean"]),
                    interval,
                    _f(row["general_mean"]),
                    _f(row["average"]),
                    f"{row['weight']:.4f}",
                    f"<span class='{cls}'>{escape(row['code'])}</span>",
                    escape(row["reason"]),
                ]
            )
        header = ["uid", "hotkey", "score", "domain gain", "interval", "general change"]
        header += ["moving avg", "weight", "code", "reason"]
        out.append(_table(header, rows, numeric={0, 2, 3, 5, 6, 7}))
        chart_rows = [
            {
                "label": f"uid {row['uid']}" if row["uid"] is not None else row["hotkey"][:10],
                "mean": row["domain_mean"],
                "low": row["ci_low"],
                "high": row["ci_high"],
                "score": row["score"],
            }
            for row in v["rows"]
        ]
        title = f"Round {rnd['round']}: domain loss gain per miner (nats)"
        out.append(f"<div>{interval_chart(chart_rows, title, 'gain (nats/token)')}</div>")
    return out


def _weights(snap: dict) -> list[str]:
    with_weights = [r for r in snap["rounds"] if r.get("weights")]
    if not with_weights:
        return ["<h2>Weights on chain</h2><p>no weights on chain yet</p>"]
    rnd = with_weights[0]
    rows = []
    for vuid, vector in rnd["weights"].items():
        total = sum(vector.values()) or 1
        for uid, w in vector.items():
            rows.append([vuid, uid, str(w), f"{w / total:.4f}"])
    return [
        f"<h2 id='weights'>Weights on chain, round {rnd['round']}</h2>",
        _table(["validator uid", "miner uid", "u16", "share"], rows, numeric={0, 1, 2, 3}),
    ]


def plot_series(snap: dict) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The plotted series: held-out losses (merger), training losses (miners), score history
    (validators' moving averages). Shared with `moesaic report`."""
    heldout: dict[str, list] = {"base": [], "merged": [], "best single": []}
    train: dict[str, list] = {}
    averages: dict[str, list] = {}
    for rnd in snap["rounds"]:
        r = rnd["round"]
        for m in rnd["mergers"][:1]:  # one merger's view; several mergers would repeat it
            for key, name in (("base_domain_mean", "base"), ("merged_domain_mean", "merged"),
                              ("best_single_domain_mean", "best single")):  # fmt: skip
                if m.get(key) is not None:
                    heldout[name].append((r, m[key]))
        for miner in rnd["miners"]:
            name = miner["dir"].rstrip("/").rsplit("/", 1)[-1]
            if miner.get("last_loss") is not None:
                train.setdefault(f"{name} last", []).append((r, miner["last_loss"]))
        for v in rnd["validators"][:1]:
            for row in v["rows"]:
                name = f"uid {row['uid']}" if row["uid"] is not None else row["hotkey"][:10]
                averages.setdefault(name, []).append((r, row["average"]))
    return {"heldout": heldout, "train": train, "averages": averages, **curve_series(snap)}


def curve_series(snap: dict) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The cumulative curve (dashboard.state.read_curve): domain loss of the original base, the
    network's line and the solo line per round on one fixed held-out set ("cumulative"), and
    each line's general drift from the original base ("drift"). Empty series without a curve."""
    cumulative: dict[str, list] = {"original base": [], "network": [], "solo": []}
    # The base drifts 0 by definition: drawn anyway, so each line has one colour in both charts.
    drift: dict[str, list] = {"original base": [], "network": [], "solo": []}
    found = snap.get("curve") or {}
    base = (found.get("base") or {}).get("domain_loss")
    for row in found.get("curve") or []:
        r = row["round"]
        if base is not None:
            cumulative["original base"].append((r, base))
            drift["original base"].append((r, 0.0))
        for name in ("network", "solo"):
            line = row.get(name)
            if line:
                cumulative[name].append((r, line["domain_loss"]))
                drift[name].append((r, line["general_drift"]))
    return {"cumulative": cumulative, "drift": drift}


def _plots(snap: dict) -> list[str]:
    s = plot_series(snap)
    fixed = (snap.get("curve") or {}).get("fixed_set") or {}
    what = f" (seed {fixed['seed']}, digest {str(fixed.get('digest'))[:12]})" if fixed else ""
    cumulative = [
        "<h2 id='curve'>Against the original base, on one fixed held-out set</h2>",
        "<p>The network's checkpoint after each round, one honest miner alone (solo) and the "
        f"original base, all measured on the same held-out batches{escape(what)}.</p>",
        "<div class='plots'>",
        line_chart(s["cumulative"], "Domain loss, fixed held-out set", "round",
                   "loss (nats/token)"),
        line_chart(s["drift"], "General drift from the original base", "round",
                   "loss rise (nats/token)"),
        "</div>",
    ]  # fmt: skip
    charts = [
        line_chart(s["heldout"], "Held-out domain loss per round", "round", "loss (nats/token)"),
        line_chart(s["train"], "Training loss per round (miners)", "round", "loss (nats/token)"),
        line_chart(s["averages"], "Moving-average score per round", "round", "score"),
    ]
    per_round = ["<h2 id='plots'>Per round (each round's own batches)</h2><div class='plots'>"]
    return [*cumulative, *per_round, *charts, "</div>"]


def _checkpoints(snap: dict) -> list[str]:
    points = (snap.get("chain") or {}).get("checkpoints", [])
    if not points:
        return ["<h2>Checkpoints</h2><p>no checkpoint published yet</p>"]
    rows = []
    for c in sorted(points, key=lambda c: c["round"], reverse=True):
        stored = {True: "yes", False: "MISSING", None: "-"}[c.get("in_store")]
        rows.append(
            [
                str(c["round"]),
                f"<span class='mono'>{escape(c['digest'])}</span>",
                f"<span class='mono'>{escape(c['deltas_digest'])}</span>",
                f"<span class='mono'>{escape(c['uri'])}</span>",
                str(c["block"]),
                f"<span class='mono'>{escape(c['publisher'])}</span>",
                stored,
            ]
        )
    header = ["round", "digest", "deltas digest", "uri", "block", "publisher", "in store"]
    return ["<h2 id='checkpoints'>Checkpoints</h2>", _table(header, rows, numeric={0, 4})]


def _rounds(snap: dict) -> list[str]:
    rows = []
    for rnd in snap["rounds"]:
        merge = rnd["mergers"][0] if rnd["mergers"] else {}
        decision = merge.get("decision") or "-"
        if merge.get("reason"):
            decision += f": {merge['reason']}"
        scored = sum(1 for v in rnd["validators"] if "score" in v.get("steps", []))
        rows.append(
            [
                str(rnd["round"]),
                str(len(rnd.get("commitments", []))),
                str(len(rnd.get("weights", {}))),
                str(scored),
                escape(decision),
                f"<span class='mono'>{escape(merge.get('checkpoint_digest') or '-')}</span>",
            ]
        )
    header = ["round", "commitments", "weight vectors", "validators scored", "merge", "checkpoint"]
    return ["<h2 id='rounds'>Rounds</h2>", _table(header, rows, numeric={0, 1, 2, 3})]


def _members(snap: dict) -> list[str]:
    members = (snap.get("chain") or {}).get("members", [])
    if not members:
        return []
    rows = [
        [
            str(m["uid"]),
            f"<span class='mono'>{escape(m['hotkey'])}</span>",
            _f(m["stake"]),
            "yes" if m["validator_permit"] else "",
        ]
        for m in members
    ]
    return ["<h2>Members</h2>", _table(["uid", "hotkey", "stake", "validator"], rows, {0, 2})]


__all__ = ["curve_series", "plot_series", "render"]
