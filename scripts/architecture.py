"""The project's layers, read from its imports: the layering rule and the architecture picture.

    python scripts/architecture.py            # rewrite docs/architecture.svg from the code
    python scripts/architecture.py --check    # exit 1 on a wrong-way import or a stale picture

Every import in the packages (at module level, inside functions and under TYPE_CHECKING alike)
is parsed with `ast`, never executed. The rule (docs/architecture.md):

    moesaic (CLI, devnet, the TOML loader)  ->  roles (miner, validator, merger, dashboard)
                                            ->  protocol

A package may import its own modules and any layer below it; a role may not import another
role; nothing in a layer imports `scripts` or `tests`. `tests/unit/test_layering.py` runs
`violations` on the repository and on a planted violation, and checks that the committed
picture is the one this script draws.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SVG = ROOT / "docs" / "architecture.svg"

LAYERS = {"moesaic": 2, "miner": 1, "validator": 1, "merger": 1, "dashboard": 1, "protocol": 0}
OUTSIDE = ("scripts", "tests")  # above every layer: they may import anything, nothing imports them


@dataclass(frozen=True)
class Import:
    """One import statement: the importing module, what it names, and where."""

    module: str  # dotted name of the importing module
    target: str  # dotted name of the imported module (or package)
    path: Path
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(root: Path) -> list[Import]:
    """Every import of a project module made by a module of a layered package under `root`."""
    found = []
    for top in LAYERS:
        for path in sorted((root / top).rglob("*.py")):
            module = module_name(path, root)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for target in _targets(node, package):
                    if target.split(".")[0] in (*LAYERS, *OUTSIDE):
                        found.append(Import(module, target, path, node.lineno))
    return found


def _targets(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against the importing package
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        stem = ".".join([*base, node.module] if node.module else base)
    else:
        stem = node.module or ""
    # `from protocol.moe import merge` names a module; `from x import f` names x.
    return [stem] + [f"{stem}.{alias.name}" for alias in node.names if not node.module]


def violations(root: Path = ROOT) -> list[str]:
    """Each import that points the wrong way, as 'path:line: module imports target (why)'."""
    out = []
    for imp in imports(root):
        src, dst = imp.module.split(".")[0], imp.target.split(".")[0]
        why = None
        if dst in OUTSIDE:
            why = f"{dst}/ is outside the layers"
        elif src != dst and LAYERS[dst] >= LAYERS[src]:
            why = (
                "roles do not import each other"
                if LAYERS[dst] == 1 == LAYERS[src]
                else (f"{src} (layer {LAYERS[src]}) may not import {dst} (layer {LAYERS[dst]})")
            )
        if why:
            rel = imp.path.relative_to(root)
            out.append(f"{rel}:{imp.line}: {imp.module} imports {imp.target} ({why})")
    return out


# ----------------------------------------------------------------------------- the picture


def node_of(module: str) -> str:
    """The box a module is drawn in: a protocol subpackage, a role, or a moesaic part."""
    parts = module.split(".")
    if parts[0] == "protocol" and len(parts) > 1:
        return ".".join(parts[:2])
    if parts[0] == "moesaic" and len(parts) > 1 and parts[1] in ("commands", "devnet"):
        return ".".join(parts[:2])
    return parts[0]


def graph(root: Path = ROOT) -> tuple[list[str], Counter]:
    """Boxes (every module's node) and edge weights (import statements between two boxes)."""
    known = set()
    for top in LAYERS:
        for path in (root / top).rglob("*.py"):
            known.add(node_of(module_name(path, root)))
    edges = Counter()
    for imp in imports(root):
        a, b = node_of(imp.module), node_of(imp.target)
        if a != b and b in known:
            edges[a, b] += 1
    # A box nothing imports and that imports nothing (a package's bare __init__) is left out.
    linked = {n for edge in edges for n in edge}
    return sorted(known & linked), edges


def _rows(nodes: list[str], edges: Counter) -> list[list[str]]:
    """Top to bottom: moesaic, roles, then protocol split by depth (what imports nothing else of
    protocol sits lowest), each row ordered to keep edges short."""
    proto = [n for n in nodes if n.startswith("protocol")]
    depth = dict.fromkeys(proto, 0)
    for _ in proto:  # longest path to a sink, bounded by the node count (cycles stop there)
        for a, b in edges:
            if a in depth and b in depth and depth[a] < depth[b] + 1 <= len(proto):
                depth[a] = depth[b] + 1
    rows = [[n for n in nodes if n.startswith("moesaic")], [n for n in nodes if LAYERS.get(n) == 1]]
    for d in sorted(set(depth.values()), reverse=True):
        rows.append(sorted(n for n in proto if depth[n] == d))
    return [r for r in rows if r]


def svg(root: Path = ROOT) -> str:
    nodes, edges = graph(root)
    rows = _rows(nodes, edges)
    box_w, box_h, gap_x, gap_y, margin = 150, 34, 24, 70, 20
    width = max(len(r) for r in rows) * (box_w + gap_x) - gap_x + 2 * margin
    height = len(rows) * (box_h + gap_y) - gap_y + 2 * margin + 24
    at = {}
    for i, row in enumerate(rows):
        row_w = len(row) * (box_w + gap_x) - gap_x
        x0 = (width - row_w) / 2
        for j, name in enumerate(row):
            at[name] = (x0 + j * (box_w + gap_x), margin + i * (box_h + gap_y))
    colour = {2: "#fde2c4", 1: "#cfe8cf", 0: "#d6e4f5"}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
        '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
    ]
    # Only which boxes import which is drawn (not how often), so the picture changes when the
    # structure does, not with every import added inside a package pair already linked.
    for a, b in sorted(edges):
        (xa, ya), (xb, yb) = at[a], at[b]
        x1, y1 = xa + box_w / 2, ya + (box_h if yb > ya else 0)
        x2, y2 = xb + box_w / 2, yb + (0 if yb > ya else box_h)
        if ya == yb:  # same row: from side to side
            y1 = y2 = ya + box_h / 2
            x1, x2 = (xa + box_w, xb) if xb > xa else (xa, xb + box_w)
        # Arrows inside protocol are the ones a newcomer reads; the layers' arrows are faint.
        inner = a.startswith("protocol") and b.startswith("protocol")
        opacity = 0.8 if inner else 0.25
        out.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#555" '
            f'stroke-opacity="{opacity}" stroke-width="1.2" marker-end="url(#a)">'
            f"<title>{a} -> {b}</title></line>"
        )
    for name, (x, y) in sorted(at.items()):
        fill = colour[LAYERS[name.split(".")[0]]]
        out.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="{fill}" stroke="#333"/>'
        )
        out.append(
            f'<text x="{x + box_w / 2:.1f}" y="{y + box_h / 2 + 4:.1f}" '
            f'text-anchor="middle">{name}</text>'
        )
    out.append(
        f'<text x="{margin}" y="{height - 10:.0f}" fill="#444">Drawn by scripts/architecture.py '
        "from the imports: arrows point from importer to imported."
        "</text>"
    )
    return "\n".join(out) + "\n</svg>\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail on violations or a stale picture")
    args = p.parse_args(argv)
    bad = violations()
    for line in bad:
        print(line, file=sys.stderr)
    drawn = svg()
    if args.check:
        stale = not SVG.exists() or SVG.read_text() != drawn
        if stale:
            print(
                f"{SVG.relative_to(ROOT)} is stale: run python scripts/architecture.py",
                file=sys.stderr,
            )
        return 1 if bad or stale else 0
    SVG.write_text(drawn)
    print(f"wrote {SVG.relative_to(ROOT)} ({len(bad)} layering violations)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
