"""Print the hostile-world counts: artifact classes, cheating strategies, faults, contract rules.

    python scripts/security_counts.py            # the counts the README quotes
    python scripts/security_counts.py --check    # also: every named test exists, every corpus
                                                 # class is in the table (exit 1 otherwise)
    python scripts/security_counts.py --check --strict   # and no row is still TODO

Artifact classes are counted from the corpus registry (tests/hostile/corpus.py, no torch
needed); cheats, faults and contract properties are the rows of their sections in
docs/security.md. A test is named `path::function` in backticks; `TODO` marks a row whose test
is not written yet.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "security.md"
SECTIONS = {  # doc heading -> what the count is called
    "Hostile artifacts": "artifact rows",
    "Cheating strategies": "cheating strategies",
    "Validators": "validator attacks",
    "Faults": "faults",
    "Contracts": "contract properties",
    "Keys and logs": "key and log rules",
}
_TICKED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Row:
    section: str
    threat: str
    defence: str
    tests: tuple[str, ...]  # empty when the row is TODO
    todo: bool


def corpus_classes() -> list[str]:
    """Names of the artifact classes in the corpus registry."""
    sys.path.insert(0, str(ROOT / "tests"))  # the corpus is the `hostile` test package
    try:
        from hostile.corpus import CLASSES
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return [c.name for c in CLASSES]


def parse(doc: Path = DOC) -> list[Row]:
    """Table rows of the known sections (header and separator lines skipped)."""
    rows, section = [], None
    for line in doc.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip() if line[3:].strip() in SECTIONS else None
            continue
        if section is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("threat", "") or set(cells[0]) <= set("-: "):
            continue
        threat, defence, tests = cells
        todo = tests.upper() == "TODO"
        names = () if todo else tuple(t for t in _TICKED.findall(tests) if "::" in t)
        rows.append(Row(section, threat, defence, names, todo))
    return rows


def test_exists(name: str) -> bool:
    """Whether `path::function` names a test function defined in that file under tests/."""
    path, _, func = name.partition("::")
    file = ROOT / path
    if not path.startswith("tests/") or not file.is_file():
        return False
    func = func.split("::")[-1].split("[")[0]  # Class::test and test[param] name the function
    return re.search(rf"^\s*(async\s+)?def {re.escape(func)}\(", file.read_text(), re.M) is not None


def problems(rows: list[Row], classes: list[str], *, strict: bool = False) -> list[str]:
    """What is wrong with the table: unknown tests, rows without tests, classes not listed."""
    out = []
    for row in rows:
        if row.todo:
            if strict:
                out.append(f"{row.section}: {row.threat!r} has no test yet (TODO)")
            continue
        if not row.tests:
            out.append(f"{row.section}: {row.threat!r} names no test")
        out += [f"{row.section}: test {t} does not exist" for t in row.tests if not test_exists(t)]
    listed = set()
    for row in rows:
        if row.section == "Hostile artifacts":
            listed |= set(_TICKED.findall(row.threat))
    out += [
        f"corpus class {c} is not in the Hostile artifacts table"
        for c in classes
        if c not in listed
    ]
    # Identifier-like names in the table that the corpus lacks: a typo or a removed class.
    named = {n for n in listed if re.fullmatch(r"[a-z0-9_]+", n)}
    out += [
        f"{n} in the Hostile artifacts table is no corpus class"
        for n in sorted(named - set(classes))
    ]
    return out


def counts(rows: list[Row], classes: list[str]) -> list[str]:
    lines = [f"artifact classes: {len(classes)}"]
    for section, label in SECTIONS.items():
        if section == "Hostile artifacts":
            continue
        mine = [r for r in rows if r.section == section]
        todo = sum(r.todo for r in mine)
        lines.append(f"{label}: {len(mine)} ({len(mine) - todo} tested, {todo} TODO)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=DOC, help="threat model (default docs/security.md)")
    ap.add_argument("--check", action="store_true", help="fail on unknown tests or classes")
    ap.add_argument("--strict", action="store_true", help="with --check: fail on TODO rows")
    args = ap.parse_args(argv)
    rows, classes = parse(args.doc), corpus_classes()
    for line in counts(rows, classes):
        print(line)
    if args.check:
        found = problems(rows, classes, strict=args.strict)
        for p in found:
            print(f"error: {p}", file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
