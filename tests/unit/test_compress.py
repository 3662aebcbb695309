"""scripts.compress: round-trip error bounds, byte accounting and error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.compress import Encoded, ErrorFeedback, Spec, decode, encode, roundtrip

KEY = "model.layers.0.mlp.experts.3.gate_proj.weight"


def _delta(seed: int = 0, shape=(16, 48), n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.0.mlp.experts.{e}.gate_proj.weight": torch.randn(*shape, generator=g) * 1e-3
        for e in range(n)
    }


def test_spec_parsing_and_rejections():
    assert str(Spec.parse("topk:0.010")) == "topk:0.01"
    assert Spec.parse("lowrank:0.25") == Spec("lowrank", 0.25)
    assert Spec.parse("fp32").lossless and not Spec.parse("int8").lossless
    for bad in ("gzip", "topk", "topk:0", "topk:1.5", "lowrank:x", "int8:3"):
        with pytest.raises(ValueError):
            Spec.parse(bad)


def test_encode_refuses_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        encode({}, "bf16")
    with pytest.raises(ValueError, match="floating"):
        encode({KEY: torch.ones(2, 2, dtype=torch.int32)}, "bf16")
    with pytest.raises(ValueError, match="non-finite"):
        encode({KEY: torch.tensor([[1.0, float("nan")]])}, "int8")
    with pytest.raises(ValueError, match="reserved"):
        encode({"a/b": torch.ones(2, 2)}, "int8")


def test_fp32_is_exact_and_bf16_within_its_rounding():
    d = _delta()
    exact, _ = roundtrip(d, "fp32")
    approx, _ = roundtrip(d, "bf16")
    for k, t in d.items():
        assert torch.equal(exact[k], t)
        assert exact[k].shape == t.shape and approx[k].dtype == torch.float32
        # bfloat16 keeps 8 significant bits: relative error at most 2^-8 per value.
        assert bool(((approx[k] - t).abs() <= t.abs() * 2**-8).all())
        assert not torch.equal(approx[k], t)  # it did round


def test_int8_error_is_at_most_half_a_step_per_row():
    d = _delta(1)
    d[KEY] = torch.zeros(4, 8)  # an all-zero row/tensor must survive the zero scale
    d[KEY][1] = torch.linspace(-2.0, 5.0, 8)
    out, _ = roundtrip(d, "int8")
    for k, t in d.items():
        step = t.abs().amax(dim=1, keepdim=True) / 127
        assert bool(((out[k] - t).abs() <= step / 2 + 1e-7).all()), k
    assert torch.equal(out[KEY][0], torch.zeros(8))
    assert float(out[KEY][1].abs().max()) == pytest.approx(5.0)  # the row max is exact


def test_topk_keeps_exactly_the_largest_magnitudes():
    t = torch.randn(20, 50, generator=torch.Generator().manual_seed(2))
    density = 0.07
    out = decode(encode({KEY: t}, f"topk:{density}"))[KEY]
    k = math.ceil(density * t.numel())
    kept = out != 0
    assert int(kept.sum()) == k
    threshold = torch.topk(t.abs().flatten(), k).values[-1]
    assert bool((t.abs()[kept] >= threshold).all())
    assert bool((out[~kept] == 0).all())
    step = float(t.abs().max()) / 127
    assert float((out[kept] - t[kept]).abs().max()) <= step / 2 + 1e-6
    assert bool((torch.sign(out[kept]) == torch.sign(t[kept])).all())


def test_topk_uses_wide_indices_only_for_wide_rows():
    narrow = encode({KEY: torch.randn(2, 100)}, "topk:0.1")
    wide = encode({KEY: torch.randn(1, 40_000)}, "topk:0.001")
    assert narrow.payload[f"{KEY}/cols"].dtype == torch.int16
    assert wide.payload[f"{KEY}/cols"].dtype == torch.int32
    t = torch.zeros(1, 40_000)
    t[0, 39_999] = 3.0  # a column index past int16 must come back in place
    assert decode(encode({KEY: t}, "topk:0.00002"))[KEY][0, 39_999] == pytest.approx(3.0)


def test_lowrank_is_exact_on_low_rank_input_and_optimal_otherwise():
    g = torch.Generator().manual_seed(3)
    low = torch.randn(32, 2, generator=g) @ torch.randn(2, 64, generator=g)
    out = decode(encode({KEY: low}, "lowrank:0.0625"))[KEY]  # rank 2 of 32
    assert float((out - low).norm() / low.norm()) < 1e-2  # only bf16 rounding of the factors

    full = torch.randn(32, 64, generator=g)
    s = torch.linalg.svdvals(full)
    out = decode(encode({KEY: full}, "lowrank:0.25"))[KEY]  # rank 8
    tail = float(s[8:].norm())  # Eckart-Young: the best rank-8 error
    assert float((out - full).norm()) == pytest.approx(tail, rel=0.01)


def test_lowrank_randomized_path_on_large_matrices():
    g = torch.Generator().manual_seed(4)
    low = torch.randn(300, 4, generator=g) @ torch.randn(4, 400, generator=g)
    enc = encode({KEY: low}, "lowrank:0.02")  # rank 6 >= the true rank 4
    assert enc.payload[f"{KEY}/left"].shape == (300, 6)
    assert float((decode(enc)[KEY] - low).norm() / low.norm()) < 1e-2
    # Seeded: the same delta always gives the same bytes.
    assert enc.to_bytes() == encode({KEY: low}, "lowrank:0.02").to_bytes()


def test_bytes_accounting_matches_the_serialisation_and_the_formulas():
    d = _delta(5, shape=(16, 48), n=3)
    n = sum(t.numel() for t in d.values())
    rows = sum(t.shape[0] for t in d.values())
    expected_payload = {
        "fp32": 4 * n,
        "bf16": 2 * n,
        "int8": n + 4 * rows,  # one byte per value + a float32 scale per row
        # per tensor: k values (int8) + k int16 columns + int16 count per row + one scale
        "topk:0.1": sum(math.ceil(0.1 * t.numel()) * 3 + 2 * t.shape[0] + 4 for t in d.values()),
        "lowrank:0.25": sum(2 * 4 * (t.shape[0] + t.shape[1]) for t in d.values()),
    }
    sizes = {}
    for spec, payload in expected_payload.items():
        enc = encode(d, spec)
        assert enc.payload_bytes() == payload, spec
        data = enc.to_bytes()
        assert enc.wire_bytes() == len(data) > payload
        back = Encoded.from_bytes(data)
        assert back.spec == spec and back.shapes == enc.shapes
        for k, t in decode(enc).items():
            assert torch.equal(decode(back)[k], t)
        sizes[spec] = len(data)
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["topk:0.1"]


def test_error_feedback_keeps_what_was_dropped():
    ef = ErrorFeedback("topk:0.05")
    d = _delta(6)
    sent = decode(ef.encode(d))
    for k in d:
        assert torch.allclose(ef.residual[k], d[k] - sent[k])
    assert ef.residual_norm() > 0


def test_error_feedback_sum_sent_tracks_sum_trained():
    ef = ErrorFeedback("topk:0.02")
    rounds = [_delta(10 + r) for r in range(6)]
    total_sent = {k: torch.zeros_like(t) for k, t in rounds[0].items()}
    for d in rounds:
        for k, t in decode(ef.encode(d)).items():
            total_sent[k] += t
    for k in total_sent:
        trained = sum(d[k] for d in rounds)
        assert torch.allclose(total_sent[k] + ef.residual[k], trained, atol=1e-6)
    # Without the residual, the same rounds lose much more of the sum.
    plain = {k: sum(decode(encode(d, "topk:0.02"))[k] for d in rounds) for k in total_sent}
    err_ef = math.sqrt(
        sum(float((total_sent[k] - sum(d[k] for d in rounds)).norm()) ** 2 for k in plain)
    )
    err_plain = math.sqrt(
        sum(float((plain[k] - sum(d[k] for d in rounds)).norm()) ** 2 for k in plain)
    )
    assert err_ef < err_plain


def test_error_feedback_eventually_sends_small_persistent_entries():
    # One large entry and one small constant entry: plain top-1 never sends the small one,
    # error feedback sends it once its accumulated residual outgrows the large one.
    t = torch.zeros(1, 4)
    t[0, 0], t[0, 3] = 1.0, 0.3
    ef = ErrorFeedback("topk:0.25")  # one value per round
    seen_small = False
    for _ in range(8):
        seen_small |= bool(decode(ef.encode({KEY: t}))[KEY][0, 3] != 0)
    assert seen_small
    assert all(float(decode(encode({KEY: t}, "topk:0.25"))[KEY][0, 3]) == 0 for _ in range(2))


def test_error_feedback_drops_residual_of_keys_that_left_the_assignment():
    ef = ErrorFeedback("topk:0.1")
    d = _delta(7, n=2)
    ef.encode(d)
    gone = sorted(d)[0]
    norm_gone = float(ef.residual[gone].norm())
    ef.encode({k: v for k, v in d.items() if k != gone})
    assert gone not in ef.residual
    assert ef.dropped_norm == pytest.approx(norm_gone, rel=1e-6)
