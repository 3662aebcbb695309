"""Every module says what it is in its docstring, and no two modules say it with the same words.

A newcomer reads the first sentence of each file to find their way; two files opening alike
(a copied header) send them to the wrong one.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("moesaic", "miner", "validator", "merger", "dashboard", "protocol", "scripts")


def first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]


def opening_sentences(root: Path) -> dict[str, list[str]]:
    """First docstring sentence -> modules opening with it ('' for a module without one)."""
    seen = defaultdict(list)
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            seen[first_sentence(doc)].append(str(path.relative_to(root)))
    return seen


def test_every_module_has_a_docstring():
    assert opening_sentences(ROOT).get("", []) == []


def test_no_two_modules_open_with_the_same_sentence():
    repeated = {s: paths for s, paths in opening_sentences(ROOT).items() if s and len(paths) > 1}
    assert repeated == {}


def test_a_repeated_opening_is_found(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "protocol").mkdir(exist_ok=True)
        (tmp_path / "protocol" / f"{name}.py").write_text(
            '"""Delta wire encodings: x.\n\nMore."""\n'
        )
    (tmp_path / "protocol" / "c.py").write_text("x = 1\n")
    seen = opening_sentences(tmp_path)
    assert seen["Delta wire encodings: x."] == ["protocol/a.py", "protocol/b.py"]
    assert seen[""] == ["protocol/c.py"]
