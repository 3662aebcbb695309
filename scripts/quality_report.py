"""Turn the quality-table points into quality.json, quality.md and frontier.png.

Choosing is done on the validation split only; every number in the tables is on the held-out
test split. Two views: each method at its best domain gain, and each method at matched drift
(the best domain loss among its points whose general-loss drift stays within a budget).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from protocol.ops.atomic import write_text_atomic

DOMAIN = "math"
GENERAL = ("prose", "code")


def _general(pt, split: str) -> float:
    d = pt.val if split == "val" else pt.test
    return sum(d[g] for g in GENERAL) / len(GENERAL)


def choose(points, drift_budget: float | None):
    """Best-gain point per method, matched-drift point per method, and the budget used."""
    base = next(p for p in points if p.method == "base")
    methods = [m for m in dict.fromkeys(p.method for p in points) if m != "base"]
    by = {m: [p for p in points if p.method == m] for m in methods}
    best = {m: min(ps, key=lambda p: p.val[DOMAIN]) for m, ps in by.items()}
    if drift_budget is None:
        # The drift that the most conservative method pays at its own best gain: every method
        # is then compared where none is allowed to forget more than that one did.
        drift_budget = max(
            0.005, min(_general(p, "val") - _general(base, "val") for p in best.values())
        )
    matched = {}
    for m, ps in by.items():
        ok = [p for p in ps if _general(p, "val") - _general(base, "val") <= drift_budget + 1e-9]
        matched[m] = min(ok, key=lambda p: p.val[DOMAIN]) if ok else None
    return base, best, matched, drift_budget


def _row(pt, base) -> str:
    gain = base.test[DOMAIN] - pt.test[DOMAIN]
    drift = _general(pt, "test") - _general(base, "test")
    lr = f"{pt.lr:g}" if pt.lr else "-"
    p = f"{pt.p:g}" if pt.p else "-"
    tps = f"{pt.tokens_per_s:,.0f}" if pt.tokens_per_s else "-"
    mem = f"{pt.peak_mib:.1f}" if pt.peak_mib else "-"
    experts = str(pt.experts) if pt.experts else "-"
    return (
        f"| {pt.method} | {lr} | {p} | {experts} | {pt.test[DOMAIN]:.4f} | {gain:+.4f} | "
        f"{pt.test['prose']:.4f} | {pt.test['code']:.4f} | {drift:+.4f} | {pt.trainable_params:,} | "
        f"{pt.artifact_bytes:,} | {tps} | {mem} |"
    )


HEADER = (
    "| method | lr | p | experts | math loss | math gain | prose loss | code loss | general drift | "
    "trainable params | artifact bytes | tokens/s | train memory MiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(points, meta, base, best, matched, budget) -> str:
    pre = meta["preset_values"]
    lines = [
        "# Quality table: expert-sparse fine-tuning vs the alternatives",
        "",
        f"Preset `{meta['preset']}`. Base: tiny Qwen3-MoE ({meta['base_params']:,} params) pre-trained on "
        f"{' + '.join(GENERAL)}; new domain: **{DOMAIN}** (CHAMP problems and solutions, held out of "
        f"pre-training). Every method trains {pre['steps']} steps x {pre['batch_size']} x {pre['seq_len']} "
        f"tokens = {pre['steps'] * pre['batch_size'] * pre['seq_len']:,} tokens. Points are chosen on the "
        f"validation split; all losses below are on the held-out test split "
        f"({pre['test_batches']} batches per domain). Losses are nats/token; gain = base minus method "
        "(higher is better); drift = general loss minus base (lower is better).",
        "",
        "## Each method at its best domain gain (chosen on validation)",
        "",
        HEADER,
        _row(base, base),
        *[_row(p, base) for p in best.values()],
        "",
        f"## Each method at matched drift (validation drift <= {budget:.4f} nats)",
        "",
        HEADER,
        *[
            _row(p, base) if p else f"| {m} | no point within the budget |||||||||||| "
            for m, p in matched.items()
        ],
        "",
        "## Every point of the sweep",
        "",
        HEADER,
        *[_row(p, base) for p in points],
        "",
        "Columns: *artifact bytes* is what the method would ship per contributor, float32 (TEFT: the "
        "real delta file; full: all weights; LoRA: the adapters). *train memory* is weights + "
        "gradients + AdamW state + activations saved for backward on one step, measured with "
        "autograd hooks (CPU has no allocator peak counter). *tokens/s* is training throughput on "
        "this machine. teft-4x-avg: 4 contributors on disjoint data shards, each a quarter of the "
        "budget, deltas averaged (tokens/s per contributor).",
        "",
        "![frontier](frontier.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(points, base, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = [m for m in dict.fromkeys(p.method for p in points) if m != "base"]
    for m in methods:
        ps = [p for p in points if p.method == m]
        xs = [_general(p, "test") - _general(base, "test") for p in ps]
        ys = [base.test[DOMAIN] - p.test[DOMAIN] for p in ps]
        order = sorted(range(len(ps)), key=lambda i: xs[i])
        front, best_y = [], float("-inf")
        for i in order:  # Pareto frontier: more gain for more drift
            if ys[i] > best_y:
                front.append(i)
                best_y = ys[i]
        (line,) = ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", label=m)
        ax.scatter(xs, ys, color=line.get_color(), s=18)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("general drift on prose+code (test loss - base), nats")
    ax.set_ylabel("math gain (base - test loss), nats")
    ax.set_title("Domain gain vs general drift (each point a sweep setting)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, points, meta: dict, drift_budget: float | None) -> None:
    base, best, matched, budget = choose(points, drift_budget)
    data = {
        "meta": meta,
        "drift_budget": budget,
        "best": {m: asdict(p) for m, p in best.items()},
        "matched": {m: asdict(p) if p else None for m, p in matched.items()},
        "points": [asdict(p) for p in points],
    }
    write_text_atomic(out / "quality.json", json.dumps(data, indent=1) + "\n")
    write_text_atomic(out / "quality.md", markdown(points, meta, base, best, matched, budget))
    plot(points, base, out / "frontier.png")
