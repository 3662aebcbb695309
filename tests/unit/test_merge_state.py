"""The merge state a checkpoint carries (protocol.artifact.merge_state) and the bf16 remainder.

.venv/bin/python -m pytest -q tests/unit/test_merge_state.py

- the file round-trips the DiLoCo buffers and the remainder, its bytes are deterministic, it is
  covered by the checkpoint's digest, and transformers still loads the directory;
- a malformed file is refused with its name, not read as "no state";
- a bf16 base, several rounds of updates below half a bf16 ulp: plain rounding never moves the
  checkpoint; with the remainder carried (error feedback) checkpoint - original tracks the sum
  of the updates to within one ulp.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from protocol.artifact.export import export_checkpoint
from protocol.artifact.merge_state import (
    MERGE_STATE_FILE,
    MergeState,
    read_merge_state,
)
from protocol.identity.hashing import sha256_dir
from protocol.moe.merge import DiLoCoOuter
from protocol.moe.model import expert_layout, expert_slices, load_model

PROJS = ("gate_proj", "up_proj", "down_proj")


def _experts(model_dir, layout_pairs, dtype="float32"):
    """{hub key: float32 tensor} of the given experts of a saved model."""
    model = load_model(model_dir, dtype=dtype)
    layout = expert_layout(model)
    return layout, {
        layout.expert_key(layer, e, p): expert_slices(model, layout, layer, e)[p].float().clone()
        for layer, e in layout_pairs
        for p in PROJS
    }


def _outer(keys_shapes) -> DiLoCoOuter:
    outer = DiLoCoOuter(lr=0.7, momentum=0.9)
    outer.step({k: torch.full(s, 0.25) for k, s in keys_shapes.items()})
    return outer


def test_state_round_trips_is_deterministic_and_in_the_digest(
    tmp_path, random_moe_dir, random_assignment
):
    from transformers import AutoModelForCausalLM

    layout, original = _experts(random_moe_dir, random_assignment.pairs())
    delta = {k: torch.full_like(v, 1e-3) for k, v in original.items()}
    state = MergeState(_outer({k: v.shape for k, v in delta.items()}), {})
    out = tmp_path / "ckpt"
    card = b"---\nlibrary_name: transformers\n---\n# card\n"
    digest = export_checkpoint(
        random_moe_dir, delta, out, merge_state=state, files={"README.md": card}
    )
    got = read_merge_state(out)
    assert got.outer.steps == 1 and (got.outer.lr, got.outer.momentum) == (0.7, 0.9)
    assert got.outer.buffers.keys() == delta.keys()
    assert all(torch.equal(got.outer.buffers[k], state.outer.buffers[k]) for k in delta)
    assert got.residual == {}  # a float32 base rounds nothing
    assert (out / "README.md").read_bytes() == card
    # Same state, same bytes; and the file is part of the checkpoint's identity.
    assert got.to_bytes() == (out / MERGE_STATE_FILE).read_bytes() == state.to_bytes()
    assert digest == sha256_dir(out)
    (out / MERGE_STATE_FILE).write_bytes(MergeState(None, {}).to_bytes())
    assert sha256_dir(out) != digest
    # transformers ignores the extra files: the checkpoint loads as any HF directory.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert read_merge_state(random_moe_dir) is None  # a base without a state


def test_malformed_state_is_refused_with_its_name(tmp_path, random_moe_dir):
    from safetensors.torch import save

    work = tmp_path / "m"
    shutil.copytree(random_moe_dir, work)
    path = work / MERGE_STATE_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=MERGE_STATE_FILE):
        read_merge_state(work)
    path.write_bytes(save({"residual/x": torch.zeros(2)}))  # no metadata
    with pytest.raises(ValueError, match="not a moesaic-merge-state file"):
        read_merge_state(work)
    bad = MergeState(None, {"x": torch.tensor([1.0, float("nan")])}).to_bytes()
    path.write_bytes(bad)
    with pytest.raises(ValueError, match="non-finite"):
        read_merge_state(work)
    with pytest.raises(ValueError, match="plain visible names"):
        export_checkpoint(
            random_moe_dir, {}, tmp_path / "x", files={MERGE_STATE_FILE: b""}, overwrite=True
        )


def _bf16_base(random_moe_dir, out):
    """The random model saved in bfloat16 (config dtype bfloat16)."""
    model = load_model(random_moe_dir, dtype="bfloat16")
    model.save_pretrained(out)
    return out


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16 spacing above |x| (8 significand bits): 2^(floor(log2|x|) - 7); 0 where x == 0."""
    e = torch.floor(torch.log2(x.abs().clamp_min(1e-30)))
    return torch.where(x == 0, torch.zeros_like(x), torch.exp2(e - 7))


def test_bf16_updates_below_half_an_ulp_accumulate_with_the_remainder(
    tmp_path, random_moe_dir, random_assignment
):
    base = _bf16_base(random_moe_dir, tmp_path / "bf16")
    pairs = random_assignment.pairs()
    _, original = _experts(base, pairs, dtype="bfloat16")
    # Each round's update: 0.3 ulp away from zero, so base + update rounds back to the base.
    update = {k: 0.3 * _ulp(v) * torch.sign(v) for k, v in original.items()}
    rounds = 6
    plain, fed = base, base
    carried = MergeState()
    for r in range(rounds):
        plain_out, fed_out = tmp_path / f"plain-{r}", tmp_path / f"fed-{r}"
        export_checkpoint(plain, update, plain_out)
        export_checkpoint(fed, update, fed_out, merge_state=carried)
        carried = read_merge_state(fed_out)
        assert carried.outer is None and carried.residual.keys() == update.keys()
        plain, fed = plain_out, fed_out
    _, without = _experts(plain, pairs, dtype="bfloat16")
    _, with_feedback = _experts(fed, pairs, dtype="bfloat16")
    moved = 0
    for k, v in original.items():
        assert torch.equal(without[k], v), k  # plain rounding lost every round's update
        total = rounds * update[k]
        err = (with_feedback[k] - v) - total
        assert (err.abs() <= _ulp(with_feedback[k]) + 1e-12).all(), k
        # and the remainder kept is what the checkpoint still lacks (float32 sums: ~1e-9 off)
        assert torch.allclose(carried.residual[k], total - (with_feedback[k] - v), atol=1e-7)
        moved += int((with_feedback[k] != v).sum())
    assert moved > 0.9 * sum(v.numel() for v in original.values())
