"""FSDP2 data-parallel TEFT (miner/distributed.py) on 2 CPU processes with gloo.

One job is trained three ways on the test base with the same global batch stream: 2 ranks,
1 rank (the same FSDP2 code path), and the plain in-process `run_local`. The 2-rank run must
leave every rank's frozen shards untouched, keep optimizer state for the deltas only (split
across ranks), write a delta the validators accept, lower the loss, and train the same delta
as the single process.

Tolerance for "the same delta": the ranks compute the same arithmetic as one process except
for float32 summation order (each rank's mean loss over half the batch, then the average of
the two gradients, and matmuls blocked over 2 rows instead of 4). That rounding is ~1e-7
relative per step; AdamW divides by sqrt(v), so an element's update is at most ~lr per step
and rounding can only move it by a tiny fraction of that. We allow 1e-4 absolute, 1 % of one
step's largest update at lr=1e-2 (measured: ~1e-6). A real data-parallel bug is far above it:
ranks that skip the gradient all-reduce, or that train on the wrong rows of the batch, produce
per-element differences of the order of lr itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from miner.local import LocalJob, run_local
from moesaic.devnet.procs import free_port

ATOL = 1e-4


def _job(base, assignment, out, steps=8):
    return LocalJob(
        model=str(base),
        assignment=str(assignment),
        data="corpus:math",
        out=str(out),
        steps=steps,
        lr=1e-2,
        batch_size=4,  # global: 2 rows per rank at world size 2
        seq_len=64,
        max_tokens=20_000,
        seed=0,
        device="cpu",
    )


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_gloo_ranks_train_the_single_process_delta(test_base, test_assignment, tmp_path):
    from miner.distributed import run_distributed
    from protocol.delta_reader import read_delta_untrusted
    from protocol.experts import Assignment
    from protocol.hashing import sha256_dir
    from protocol.model import expert_layout, load_model

    reports = {}
    summaries = {}
    for world in (2, 1):
        rep = tmp_path / f"reports-{world}"
        rep.mkdir()
        job = _job(test_base, test_assignment, tmp_path / f"delta-ws{world}.safetensors")
        summaries[world] = run_distributed(job, world, "gloo", port=free_port(), report_dir=rep)
        reports[world] = [json.loads((rep / f"rank{r}.json").read_text()) for r in range(world)]

    # Every rank's shards of every frozen tensor (attention, norms, router, embeddings, the
    # fused experts under the parametrization) are bit-identical to the loaded base.
    for r in reports[2]:
        assert r["frozen_unchanged"] and all(r["frozen_unchanged"].values()), r["rank"]
        assert any("experts.gate_up_proj" in k for k in r["frozen_unchanged"])

    # Optimizer state exists for the deltas only, and each rank holds half of it.
    assignment = Assignment.load(test_assignment)
    model = load_model(test_base)
    layout = expert_layout(model)
    n_delta = assignment.num_selected() * layout.params_per_expert()
    assert reports[1][0]["optimizer_numel"] == n_delta
    assert sum(r["optimizer_numel"] for r in reports[2]) == n_delta
    assert all(r["optimizer_numel"] < n_delta for r in reports[2])

    # Rank 0's file is a valid delta for this base and assignment.
    s2 = summaries[2]
    meta, tensors2 = read_delta_untrusted(
        s2["out"],
        layout=layout,
        assignment=assignment,
        max_bytes=10 * s2["bytes"],
        expected_base_hash=sha256_dir(test_base),
        expected_round=0,
        expected_sha256=s2["sha256"],
    )
    assert meta.tokens == 8 * 4 * 64 == s2["tokens"]
    assert all(float(t.abs().max()) > 0 for t in tensors2.values()), "every expert must learn"

    # Same global batch, same delta (see the module docstring for the tolerance).
    tensors1 = load_file(summaries[1]["out"])
    assert _max_diff(tensors2, tensors1) < ATOL
    assert reports[2][0]["losses"] == reports[2][1]["losses"], "ranks agree on the global loss"
    assert reports[2][0]["losses"] == pytest.approx(reports[1][0]["losses"], abs=1e-5)

    # The world-size-1 path trains what the local miner trains.
    local = run_local(_job(test_base, test_assignment, tmp_path / "local.safetensors"), False)
    assert _max_diff(load_file(local["out"]), tensors1) < ATOL

    # Training helps: the global loss of the last steps is below that of the first ones.
    losses = reports[2][0]["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert s2["last_loss"] < s2["first_loss"]


def test_batch_must_split_evenly_across_ranks(test_base, test_assignment, tmp_path):
    from miner.distributed import _train_rank

    job = _job(test_base, test_assignment, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not divisible"):
        _train_rank(0, 3, job, "gloo", "tcp://127.0.0.1:1", None, False)
    assert torch.distributed.is_initialized() is False
