"""Imports point one way (moesaic -> roles -> protocol) and the architecture picture is current.

The checker (scripts/architecture.py) parses imports without running them, so these tests are
fast; the planted-violation test shows each rule can fail.
"""

from __future__ import annotations

from pathlib import Path

from scripts.architecture import ROOT, SVG, svg, violations


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for top in ("moesaic", "miner", "validator", "merger", "dashboard", "protocol"):
        (tmp_path / top).mkdir(exist_ok=True)
        (tmp_path / top / "__init__.py").touch()
    return tmp_path


def test_the_repository_imports_point_one_way():
    assert violations(ROOT) == []


def test_each_wrong_way_import_is_caught(tmp_path):
    root = _tree(
        tmp_path,
        {
            "protocol/moe/x.py": "def f():\n    from miner.node import Miner\n",
            "protocol/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    import moesaic.cli\n",
            "miner/a.py": "from validator import settings\n",
            "merger/b.py": "from . import c\nfrom scripts.compress import encode\n",
            "merger/c.py": "from protocol.moe import merge\n",
            "moesaic/ok.py": "import miner.a\nfrom protocol import y\n",
        },
    )
    found = violations(root)
    assert len(found) == 4, found
    assert any("protocol.moe.x imports miner.node" in v for v in found)
    assert any("protocol.y imports moesaic.cli" in v for v in found)
    assert any("miner.a imports validator" in v and "each other" in v for v in found)
    assert any("merger.b imports scripts.compress" in v for v in found)


def test_relative_imports_resolve_to_their_package(tmp_path):
    root = _tree(tmp_path, {"protocol/moe/x.py": "from ...miner import node\n"})
    # three dots from protocol.moe climb above protocol: that names the miner package
    assert any("imports miner" in v for v in violations(root))


def test_the_architecture_picture_is_drawn_from_the_current_code():
    assert SVG.exists(), "run python scripts/architecture.py"
    assert SVG.read_text() == svg(ROOT), (
        "docs/architecture.svg is stale: run scripts/architecture.py"
    )
