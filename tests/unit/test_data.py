"""Data specs, the stable document split, packing and seeded batches."""

import json

import pytest
import torch

from protocol.moe.data import (
    DataSpec,
    Doc,
    docs_for_split,
    iter_docs,
    pack,
    sample_batches,
    split_of,
)


def test_spec_parsing():
    assert DataSpec.parse("corpus:math") == DataSpec("corpus", "math")
    assert DataSpec.parse("jsonl:/x/y.jsonl#body") == DataSpec("jsonl", "/x/y.jsonl", "body")
    assert str(DataSpec.parse("jsonl:/x/y.jsonl#body")) == "jsonl:/x/y.jsonl#body"
    for bad in ("math", "web:x", "corpus:", "jsonl"):
        with pytest.raises(ValueError, match="bad data spec"):
            DataSpec.parse(bad)


def test_split_is_by_group_and_stable():
    a = Doc("p1|model-a", "p1", "x")
    b = Doc("p1|model-b", "p1", "y")
    assert split_of(a) == split_of(b)
    splits = {split_of(Doc(str(i), str(i), "")) for i in range(200)}
    assert splits == {"train", "val", "test"}


def test_jsonl_and_text_sources(tmp_path):
    rows = [{"id": f"d{i}", "group": f"g{i % 7}", "body": f"document {i} " * 5} for i in range(60)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    docs = list(iter_docs(f"jsonl:{path}#body"))
    assert [d.id for d in docs] == [r["id"] for r in rows]
    train, test = (
        docs_for_split(f"jsonl:{path}#body", "train"),
        docs_for_split(f"jsonl:{path}#body", "test"),
    )
    assert not {d.group for d in train} & {d.group for d in test}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.md").write_text("hello")
    (tmp_path / "t" / "b.bin").write_text("skip")
    assert [d.id for d in iter_docs(f"text:{tmp_path / 't'}")] == ["a.md"]
    with pytest.raises(ValueError, match="no text field"):
        list(iter_docs(f"jsonl:{path}#missing"))
    with pytest.raises(FileNotFoundError):
        list(iter_docs(f"text:{tmp_path / 'nope'}"))


def test_packed_corpus_documents_exist():
    docs = docs_for_split("corpus:math", "test")
    assert len(docs) > 100
    assert all(split_of(d) == "test" for d in docs)
    assert not {d.group for d in docs} & {d.group for d in docs_for_split("corpus:math", "train")}


def test_pack_appends_eos_and_cuts_blocks():
    blocks = pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]
    with pytest.raises(ValueError, match="not enough text"):
        pack([[1]], seq_len=8, eos_id=0)


def test_sample_batches_is_seeded():
    blocks = torch.arange(40).view(10, 4)
    a = sample_batches(blocks, 3, 5, seed=1)
    b = sample_batches(blocks, 3, 5, seed=1)
    c = sample_batches(blocks, 3, 5, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    first_pass = torch.cat(a[:3])[:, 0].tolist()
    assert len(set(first_pass)) == 9  # no repeats within a pass
