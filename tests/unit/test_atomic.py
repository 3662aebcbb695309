"""protocol/ops/atomic.py: atomic file writes and the cleanup of temps a killed writer left."""

from __future__ import annotations

import pytest

from protocol.ops.atomic import remove_stale_temps, write_bytes_atomic


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "0.delta.safetensors"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.delta.safetensors"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_bytes_atomic(target, b"old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr("protocol.ops.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_stale_temps_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "3"
    (tmp_path / ".3.abc123.tmp").write_bytes(b"half a file")
    (tmp_path / ".3.def456.tmp").mkdir()
    (tmp_path / ".3.def456.tmp" / "model.safetensors").write_bytes(b"half a checkpoint")
    keep = [tmp_path / ".30.x.tmp", tmp_path / "3.json", tmp_path / ".4.y.tmp"]
    for p in keep:
        p.write_bytes(b"someone else's")
    assert remove_stale_temps(target) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    assert remove_stale_temps(target) == 0
