"""Inline SVG charts for the dashboard: a line chart over rounds and an interval chart.

Generated as text so the page is a single self-contained document (no JavaScript, no files to
fetch, nothing from the internet) that renders the same in a browser and in headless Chromium.
Every label goes through html.escape: hotkeys and reasons come from other people's machines.
"""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 600, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 28, 40  # room for axis labels and the legend


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round-numbered ticks covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= step * mult:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [first + i * step for i in range(max(count, 1))]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _frame(title: str, xlabel: str, ylabel: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
        f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="14" y="{TOP + (HEIGHT - TOP - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + (HEIGHT - TOP - BOTTOM) / 2})">{escape(ylabel)}</text>',
    ]


def _empty(title: str, message: str) -> str:
    parts = _frame(title, "", "")
    parts.append(
        f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#777">'
        f"{escape(message)}</text></svg>"
    )
    return "".join(parts)


class _Axes:
    """Maps data coordinates into the plot area and draws the grid."""

    def __init__(self, xlo, xhi, ylo, yhi):
        pad = (yhi - ylo) * 0.08 or abs(yhi) * 0.1 or 1.0
        self.ylo, self.yhi = ylo - pad, yhi + pad
        self.xlo, self.xhi = xlo, xhi if xhi > xlo else xlo + 1
        self.w, self.h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(self, v: float) -> float:
        return LEFT + (v - self.xlo) / (self.xhi - self.xlo) * self.w

    def y(self, v: float) -> float:
        return TOP + (self.yhi - v) / (self.yhi - self.ylo) * self.h

    def grid(self, xticks: list[float], xlabels: list[str] | None = None) -> list[str]:
        out = [
            f'<rect x="{LEFT}" y="{TOP}" width="{self.w}" height="{self.h}" fill="none" '
            'stroke="#999"/>'
        ]
        for t in _ticks(self.ylo, self.yhi):
            y = self.y(t)
            out.append(f'<line x1="{LEFT}" x2="{LEFT + self.w}" y1="{y:.1f}" y2="{y:.1f}" '
                       'stroke="#eee"/>')  # fmt: skip
            out.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        for i, t in enumerate(xticks):
            label = xlabels[i] if xlabels else _fmt(t)
            out.append(
                f'<text x="{self.x(t):.1f}" y="{TOP + self.h + 14}" text-anchor="middle">'
                f"{escape(label)}</text>"
            )
        return out


def line_chart(
    series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str
) -> str:
    """One polyline with markers per named series of (x, y) points; a legend on the right."""
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return _empty(title, "no data yet")
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    axes = _Axes(min(xs), max(xs), min(ys), max(ys))
    xticks = sorted(set(xs)) if len(set(xs)) <= 12 else _ticks(min(xs), max(xs))
    parts = _frame(title, xlabel, ylabel) + axes.grid(xticks, [f"{x:g}" for x in xticks])
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{axes.x(x):.1f},{axes.y(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                     'stroke-width="2"/>')  # fmt: skip
        for x, y in pts:
            parts.append(
                f'<circle cx="{axes.x(x):.1f}" cy="{axes.y(y):.1f}" r="3" fill="{color}">'
                f"<title>{escape(name)}: round {x:g}, {_fmt(y)}</title></circle>"
            )
        ly = TOP + 6 + i * 16
        parts.append(f'<rect x="{WIDTH - RIGHT + 10}" y="{ly}" width="12" height="4" '
                     f'fill="{color}"/>')  # fmt: skip
        parts.append(
            f'<text x="{WIDTH - RIGHT + 26}" y="{ly + 6}">{escape(_short(name, 20))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def interval_chart(rows: list[dict], title: str, ylabel: str) -> str:
    """Per miner: the mean (dot), its interval (bar) and the score (diamond); a zero line.

    rows: {"label", "mean", "low", "high", "score"} with None for what is unknown.
    """
    rows = [r for r in rows if r.get("mean") is not None or r.get("score") is not None]
    if not rows:
        return _empty(title, "no scored submissions")
    values = [
        v for r in rows for v in (r.get("mean"), r.get("low"), r.get("high"), r.get("score"))
        if v is not None
    ] + [0.0]  # fmt: skip
    axes = _Axes(-0.5, len(rows) - 0.5, min(values), max(values))
    labels = [_short(r["label"], 10) for r in rows]
    parts = _frame(title, "miner", ylabel) + axes.grid(list(range(len(rows))), labels)
    zero = axes.y(0.0)
    parts.append(f'<line x1="{LEFT}" x2="{LEFT + axes.w}" y1="{zero:.1f}" y2="{zero:.1f}" '
                 'stroke="#555" stroke-dasharray="4 3"/>')  # fmt: skip
    for i, r in enumerate(rows):
        x = axes.x(i)
        tip = escape(
            f"{r['label']}: mean {_opt(r.get('mean'))}, interval [{_opt(r.get('low'))}, "
            f"{_opt(r.get('high'))}], score {_opt(r.get('score'))}"
        )
        if r.get("low") is not None and r.get("high") is not None:
            y1, y2 = axes.y(r["low"]), axes.y(r["high"])
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" '
                         'stroke="#1f77b4" stroke-width="3"/>')  # fmt: skip
        if r.get("mean") is not None:
            parts.append(f'<circle cx="{x:.1f}" cy="{axes.y(r["mean"]):.1f}" r="4" '
                         f'fill="#1f77b4"><title>{tip}</title></circle>')  # fmt: skip
        if r.get("score") is not None:
            y = axes.y(r["score"])
            parts.append(
                f'<path d="M{x - 5:.1f},{y:.1f} L{x:.1f},{y - 5:.1f} L{x + 5:.1f},{y:.1f} '
                f'L{x:.1f},{y + 5:.1f} Z" fill="#d62728"><title>{tip}</title></path>'
            )
    legend = [("#1f77b4", "mean, interval"), ("#d62728", "score (LCB, >= 0)")]
    for i, (color, text) in enumerate(legend):
        ly = TOP + 6 + i * 16
        parts.append(f'<rect x="{WIDTH - RIGHT + 10}" y="{ly}" width="12" height="6" '
                     f'fill="{color}"/>')  # fmt: skip
        parts.append(f'<text x="{WIDTH - RIGHT + 26}" y="{ly + 7}">{escape(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _opt(x) -> str:
    return "-" if x is None else _fmt(x)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


__all__ = ["interval_chart", "line_chart"]
