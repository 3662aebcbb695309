"""The compressed encodings' hostile classes start from valid files, one defect away.

tests/hostile/test_artifacts.py refuses every corpus class on both paths; here the controls
for the classes built on the valid delta re-encoded as int8, lowrank4 and lowrank4-int8
(`corpus.encoded`): each such source is accepted by `moesaic artifact verify` and the reader
and decodes to (nearly) the float32 delta it came from, and each class's file differs from
its own source, so the rejection is the defect's and not the source's.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import ROUND
from .corpus import CLASSES, SOURCE_ENCODINGS, encoded, source_encoding


def read(world, path):
    from protocol.artifact.untrusted import read_delta_untrusted

    return read_delta_untrusted(
        path,
        layout=world["layout"],
        assignment=world["assignment"],
        max_bytes=world["valid"].cap,
        expected_base_hash=world["base_hash"],
        expected_round=ROUND,
    )


def test_every_source_encoding_has_classes():
    used = {source_encoding(c) for c in CLASSES}
    assert used == {"float32", *SOURCE_ENCODINGS}
    for encoding in SOURCE_ENCODINGS:
        codes = {c.code for c in CLASSES if source_encoding(c) == encoding}
        # Each source is refused for missing parts, wrong dtypes and shapes, and bad values.
        assert {"missing_key", "dtype", "shape", "nonfinite", "magnitude"} <= codes, encoding


@pytest.mark.parametrize("encoding", SOURCE_ENCODINGS)
def test_sources_are_accepted_and_decode_to_the_delta(world, encoding, capsys, tmp_path):
    from moesaic.cli import main

    source = encoded(world["valid"], encoding)
    path = tmp_path / f"{encoding}.safetensors"
    path.write_bytes(source.data)
    argv = ["artifact", "verify", str(path), "--assignment", str(world["assignment_path"])]
    assert main([*argv, "--base", str(world["base"]), "--round", str(ROUND)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {source.sha256} experts=5 ")

    meta, got = read(world, path)
    (tmp_path / "f32.safetensors").write_bytes(world["valid"].data)
    _, dense = read(world, tmp_path / "f32.safetensors")
    assert meta.encoding == encoding and list(got) == list(world["valid"].keys)
    for key, t in got.items():
        assert t.dtype == torch.float32 and t.shape == dense[key].shape
        if encoding == "int8":  # |error| <= scale / 2 = rowmax / 254
            bound = dense[key].abs().amax(dim=1, keepdim=True) / 254
            assert bool(((t - dense[key]).abs() <= bound * (1 + 1e-5) + 1e-12).all())
        else:  # rank 4 of a random [16, 32]: the best rank-4 approximation
            u, s, vh = torch.linalg.svd(dense[key], full_matrices=False)
            best = (u[:, :4] * s[:4]) @ vh[:4]
            err = float((t - best).norm() / best.norm())
            assert err < (0.02 if encoding.endswith("int8") else 0.01), (key, err)


@pytest.mark.parametrize(
    "cls", [c for c in CLASSES if source_encoding(c) != "float32"], ids=lambda c: c.name
)
def test_each_class_is_its_source_with_a_defect(world, cls, tmp_path):
    from protocol.artifact.delta import DeltaRejected

    source = encoded(world["valid"], source_encoding(cls))
    data = cls.build(world["valid"])
    assert data != source.data
    assert cls.build(world["valid"]) == data  # deterministic
    path = tmp_path / "d.safetensors"
    path.write_bytes(data)
    with pytest.raises(DeltaRejected) as info:
        read(world, path)
    assert info.value.code == cls.code, info.value.message
