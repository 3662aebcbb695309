"""`moesaic report --out DIR`: PNG plots of a run from its state directories (and the chain).

    cumulative_curve.png    a devnet's curve on ONE fixed held-out set: domain loss of the
                            original base, the network's checkpoint and the solo line after each
                            round, and both lines' general drift from the original base (drawn
                            when the run has a summary with a curve: dashboard.state.read_curve)
    loss_per_round.png      held-out domain loss of the base, the merge and the best single
                            delta per round (merger; each round's own batches), and miners'
                            final training loss
    score_distribution.png  every validator score of the run: a histogram of the positive scores
                            (with how many were zero) and the scores per round
    scores_per_round.png    each miner's moving-average score per round (first validator)
    snapshot.json           the data the plots were drawn from

matplotlib with the Agg backend: no display needed, same output on a server as on a laptop.
"""

from __future__ import annotations

import json
from pathlib import Path

from dashboard.page import plot_series


def write_report(snap: dict, out: str | Path) -> list[Path]:
    """Write the plots and the snapshot into `out`; returns the files written."""
    import matplotlib  # noqa: PLC0415 (heavy plotting backend, loaded only to draw a report)

    matplotlib.use("Agg")  # before pyplot: never try to open a window
    import matplotlib.pyplot as plt  # noqa: PLC0415 (must follow matplotlib.use("Agg"))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series = plot_series(snap)
    written = []

    if snap.get("curve"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        _lines(axes[0], series["cumulative"], "Domain loss, fixed held-out set",
               "loss (nats/token)")  # fmt: skip
        _lines(axes[1], series["drift"], "General drift from the original base",
               "loss rise (nats/token)")  # fmt: skip
        written.append(_save(fig, out / "cumulative_curve.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _lines(axes[0], series["heldout"], "Held-out domain loss (merger)", "loss (nats/token)")
    _lines(axes[1], series["train"], "Final training loss (miners)", "loss (nats/token)")
    written.append(_save(fig, out / "loss_per_round.png"))

    scores = [
        (rnd["round"], row["score"])
        for rnd in snap["rounds"]
        for v in rnd["validators"]
        for row in v["rows"]
        if row["code"] != "no_submission"
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    positive = [s for _, s in scores if s > 0]
    zeros = len(scores) - len(positive)
    if positive:
        axes[0].hist(positive, bins=min(20, max(5, len(positive))), color="#1f77b4")
    axes[0].set_title(f"Scores > 0 ({len(positive)}); zero: {zeros}")
    axes[0].set_xlabel("score (domain gain LCB, nats/token)")
    axes[0].set_ylabel("submissions")
    if scores:
        axes[1].scatter([r for r, _ in scores], [s for _, s in scores], alpha=0.7)
    axes[1].set_title("Scores per round (all validators)")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("score")
    _no_data(axes[0], bool(scores))
    _no_data(axes[1], bool(scores))
    written.append(_save(fig, out / "score_distribution.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    _lines(ax, series["averages"], "Moving-average score per miner", "score")
    written.append(_save(fig, out / "scores_per_round.png"))

    snapshot_file = out / "snapshot.json"
    snapshot_file.write_text(json.dumps(snap, indent=1, sort_keys=True, default=str) + "\n")
    written.append(snapshot_file)
    return written


def _lines(ax, series: dict, title: str, ylabel: str) -> None:
    drawn = False
    for name, points in series.items():
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=name)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _no_data(ax, drawn)


def _no_data(ax, drawn: bool) -> None:
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415 (pyplot only after write_report chose Agg)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["write_report"]
