"""The repository is self-contained: no tracked file refers to a path outside its root.

A user's clone has nothing beside it, so a test or script that reads the reference folder
beside the developers' clone (or a path on the machine it was written on) passes only where that folder happens to exist. Relative
paths are resolved from the referring file's folder, as links and `Path(__file__)` code do;
hostile-path test inputs like "../evil" therefore stay inside and are allowed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The sibling folder of reference material, and absolute paths of a developer's machine.
NAMED = re.compile(r"(?<![\w.])(?:\.\./)+shared\b|(?<![\w.])/(?:work|home|root)/[\w.-]+")
RELATIVE = re.compile(r"(?<![\w./])((?:\.\./)+)[\w.~-]+")


def outside_references(root: Path, files: list[str]) -> list[str]:
    """'path:line: text' for each reference in `files` (relative to root) that leaves root."""
    found = []
    for rel in files:
        path = root / rel
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files, or a submodule/symlink git lists
        for number, line in enumerate(text.splitlines(), 1):
            hits = [m.group(0) for m in NAMED.finditer(line)]
            for m in RELATIVE.finditer(line):
                up = m.group(1).count("../")
                if up > len(Path(rel).parent.parts):  # climbs above the root from its folder
                    hits.append(m.group(0))
            found += [f"{rel}:{number}: {hit}" for hit in hits]
    return found


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [f for f in out.stdout.splitlines() if f != "package-lock.json"]


def test_no_tracked_file_refers_outside_the_repository():
    assert outside_references(ROOT, _tracked()) == []


# The planted references are assembled here so that this file does not contain them itself.
UP, SIBLING, MACHINE = "../", "shared", "/" + "work/main"


def test_references_outside_are_caught(tmp_path):
    files = {
        "tests/integration/spec.py": f'SPEC = "{UP}{SIBLING}/chain/x.json"\n',
        "docs/x.md": f"see [bench]({UP}bench.md) and {UP}{UP}elsewhere.txt\n",
        "scripts/y.sh": f"cat {MACHINE}/runs/a /tmp/fine\n",
        "tests/unit/hostile.py": 'bad_name = "../evil"  # stays inside: not a reference out\n',
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = outside_references(tmp_path, list(files))
    assert found == [
        f"tests/integration/spec.py:1: {UP}{SIBLING}",
        f"docs/x.md:1: {UP}{UP}elsewhere.txt",
        f"scripts/y.sh:1: {MACHINE}",
    ]
