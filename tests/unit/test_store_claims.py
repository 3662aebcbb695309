"""The blob server's claim book, quota verdicts and connection limits, without a server."""

from __future__ import annotations

import json

import pytest

from moesaic.commands.store import parse_size
from protocol.storage.claims import LEGACY, ClaimBook, Quota, Usage, over_quota
from protocol.storage.guard import ConnectionLimits

A = "0x" + "aa" * 20
B = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
SHA1, SHA2, SHA3 = "1" * 64, "2" * 64, "3" * 64


def test_claims_charge_each_holder_and_the_bytes_go_with_the_last(tmp_path):
    book = ClaimBook.open(tmp_path, {})
    book.add(SHA1, 100, A.upper().replace("0X", "0x"))  # an address in any case is one holder
    book.add(SHA1, 100, B)
    book.add(SHA1, 100, A)  # a second upload by A: no second charge
    assert book.usage(A) == Usage(100, 1) and book.usage(B) == Usage(100, 1)
    assert book.holders(SHA1) == {A, B}
    assert book.remove(SHA1, B) == 1  # A's claim remains: the caller keeps the bytes
    assert book.usage(B) == Usage(0, 0) and not book.holds(SHA1, B)
    assert json.loads((tmp_path / "claims" / "11" / f"{SHA1}.json").read_text())["holders"] == [A]
    assert book.remove(SHA1, A) == 0
    book.forget(SHA1)
    assert book.usage(A) == Usage(0, 0)
    assert not (tmp_path / "claims" / "11" / f"{SHA1}.json").exists()


def test_open_reconciles_claims_with_the_objects_on_disk(tmp_path):
    book = ClaimBook.open(tmp_path, {})
    book.add(SHA1, 10, A)
    book.add(SHA2, 20, A)  # recorded, then the server died before installing the object
    reopened = ClaimBook.open(tmp_path, {SHA1: 10, SHA3: 30})  # SHA3: stored before claims
    assert reopened.holders(SHA1) == {A}
    assert reopened.holders(SHA2) == set()
    assert not (tmp_path / "claims" / "22" / f"{SHA2}.json").exists()
    assert reopened.holders(SHA3) == {LEGACY}
    assert reopened.usage(A) == Usage(10, 1)
    assert ClaimBook.open(tmp_path, {SHA1: 10, SHA3: 30}).holders(SHA3) == {LEGACY}  # persisted


@pytest.mark.parametrize(
    "usage, size, expected",
    [
        (Usage(0, 0), 100, None),
        (Usage(60, 1), 40, None),  # exactly at the byte quota
        (Usage(60, 1), 41, "41 more would pass the quota of 100"),
        (Usage(0, 3), 1, "holds 3 objects, the quota is 3"),
    ],
)
def test_over_quota(usage, size, expected):
    verdict = over_quota(usage, size, Quota(max_bytes=100, max_objects=3))
    assert verdict == expected if expected is None else expected in verdict


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_limits_are_validated_at_construction(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        Quota(max_bytes=bad, max_objects=1)
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(max_connections=bad)
    if not isinstance(bad, (str, bool)) and bad <= 0:
        with pytest.raises(ValueError, match="header_timeout_s"):
            ConnectionLimits(header_timeout_s=bad)


def test_serve_defaults_parse():
    assert parse_size("1T") == Quota(max_bytes=1 << 40, max_objects=1).max_bytes
    assert ConnectionLimits() == ConnectionLimits(10.0, 60.0, 256)
