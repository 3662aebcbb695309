"""Data source: real local text -> documents -> a stable split -> packed token blocks.

A data spec names where text comes from:
  corpus:NAME           a packaged corpus (prose, code, math; see protocol.moe.corpora)
  jsonl:PATH[#FIELD]    one JSON object per line, text in FIELD (default "text"); optional
                        "id" and "group" fields
  text:PATH             a text file, or every .txt/.md/.py/.rst file under a directory
  hf:PATH[#FIELD]       a Hugging Face `datasets` dataset saved with save_to_disk (local)

Splits are decided per document *group* from a hash of its name, so they never change when
documents are added elsewhere and a problem's solutions never straddle train and held-out.
The pseudo-split ALL ("all") is every document of a spec: a validator's private held-out text
(validator/settings.py `heldout`) has no public part to split off.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol.moe.corpora import fetch
from protocol.ops.atomic import write_text_atomic

SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
ALL = "all"  # not a split: every document of the spec
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


@dataclass(frozen=True)
class Doc:
    id: str
    group: str
    text: str


@dataclass(frozen=True)
class DataSpec:
    kind: str
    target: str
    field: str = "text"

    @classmethod
    def parse(cls, spec: str) -> DataSpec:
        kind, sep, rest = spec.partition(":")
        if not sep or kind not in ("corpus", "jsonl", "text", "hf") or not rest:
            raise ValueError(
                f"bad data spec {spec!r}: use corpus:NAME, jsonl:PATH[#FIELD], text:PATH or hf:PATH[#FIELD]"
            )
        target, _, field = rest.partition("#")
        return cls(kind, target, field or "text")

    def __str__(self) -> str:
        suffix = f"#{self.field}" if self.kind in ("jsonl", "hf") and self.field != "text" else ""
        return f"{self.kind}:{self.target}{suffix}"


def _jsonl_docs(path: Path, field: str) -> Iterator[Doc]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row[field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n + 1}: no text field {field!r} ({e})") from e
            doc_id = str(row.get("id", f"{path.name}:{n}"))
            yield Doc(doc_id, str(row.get("group", doc_id)), str(text))


def _text_docs(path: Path) -> Iterator[Doc]:
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    )
    for p in files:
        rel = str(p.relative_to(path)) if p != path else p.name
        yield Doc(rel, rel, p.read_text(encoding="utf-8", errors="replace"))


def _hf_docs(path: Path, field: str) -> Iterator[Doc]:
    try:
        import datasets  # noqa: PLC0415 (optional dependency: only hf: data specs need datasets)
    except ImportError as e:
        raise ValueError("hf: data specs need the `datasets` package (pip install datasets)") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for n, row in enumerate(ds):
        doc_id = str(row.get("id", n))
        yield Doc(doc_id, doc_id, str(row[field]))


def iter_docs(spec: DataSpec | str) -> Iterator[Doc]:
    """All documents of a spec, in a stable order."""
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.kind == "corpus":
        yield from _jsonl_docs(fetch((spec.target,), quiet=True)[spec.target], "text")
        return
    path = Path(spec.target).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data spec {spec}: {path} does not exist")
    if spec.kind == "jsonl":
        yield from _jsonl_docs(path, spec.field)
    elif spec.kind == "text":
        yield from _text_docs(path)
    else:
        yield from _hf_docs(path, spec.field)


def bucket(key: str) -> int:
    """0..99 from a stable hash of a group name."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def split_of(doc: Doc) -> str:
    b = bucket(doc.group)
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= b < hi)


def docs_for_split(spec: DataSpec | str, split: str, order_key: str = "") -> list[Doc]:
    """One split's documents in a stable pseudo-random order: by sha256 of the id, or with an
    `order_key` (a miner's shard, protocol.round.shards) by sha256 of key and id, so each key
    reads its own sample of the split from the front."""
    if split != ALL and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)} or {ALL}")
    docs = [d for d in iter_docs(spec) if split == ALL or split_of(d) == split]
    # Order by a hash of the id, not file order, so a token budget samples the whole split.
    prefix = f"{order_key}:" if order_key else ""
    docs.sort(key=lambda d: hashlib.sha256((prefix + d.id).encode()).digest())
    return docs


def write_docs(spec: DataSpec | str, split: str, path: str | Path) -> int:
    """Write one split's documents as a jsonl file ({"id", "group", "text"} a line, readable as
    jsonl:PATH), atomically; how many. The devnet carves its validators' held-out text this way."""
    docs = docs_for_split(spec, split)
    rows = [json.dumps(d.__dict__, ensure_ascii=False) for d in docs]
    write_text_atomic(Path(path), "".join(row + "\n" for row in rows))
    return len(docs)


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int, max_tokens: int | None = None):
    """Concatenate documents (each followed by EOS) and cut [N, seq_len] blocks."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
        if max_tokens and len(flat) >= max_tokens:
            break
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"not enough text for one block of {seq_len} tokens ({len(flat)} tokens)")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_blocks(
    spec, split: str, tokenizer, seq_len: int, max_tokens: int | None = None, order_key: str = ""
):
    """Token blocks [N, seq_len] of one split of a spec, at most ~max_tokens tokens, read in
    the order docs_for_split gives for `order_key`."""
    docs = docs_for_split(spec, split, order_key)
    if not docs:
        raise ValueError(f"data spec {spec}: the {split!r} split has no documents")
    token_lists, total = [], 0
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        token_lists.append(ids)
        total += len(ids) + 1
        if max_tokens and total >= max_tokens:
            break
    return pack(token_lists, seq_len, tokenizer.eos_token_id, max_tokens)


def sample_batches(
    blocks: torch.Tensor, batch_size: int, num_batches: int, seed: int
) -> list[torch.Tensor]:
    """`num_batches` batches of distinct blocks drawn with a seeded generator (no replacement
    within a pass). Everyone holding the same blocks and seed gets the same batches."""
    g = torch.Generator().manual_seed(seed)
    need = batch_size * num_batches
    order = torch.cat(
        [torch.randperm(len(blocks), generator=g) for _ in range(-(-need // len(blocks)))]
    )
    return [blocks[order[i * batch_size : (i + 1) * batch_size]] for i in range(num_batches)]


def batch_stream(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless training batches: seeded reshuffle each epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(blocks), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield blocks[perm[i : i + batch_size]]
