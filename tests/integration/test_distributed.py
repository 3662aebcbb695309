"""FSDP2 data-parallel TEFT (miner/distributed.py) on 2 CPU processes with gloo.

Loading: only rank 0 reads the checkpoint; rank 1 builds on the meta device and receives its
shards (and the non-persistent buffers: rotary inv_freq, expert_ids) from rank 0. A spy in each
rank records every read of the weights (Python opens of *.safetensors, safetensors' own reader,
from_pretrained); rank 1 must record none, and its sharded model must compute the logits of a
normally loaded base.

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
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miner.local import LocalJob, run_local
from protocol.ops.net import free_port
from protocol.settings import TrainSettings

ATOL = 1e-4


def _job(base, assignment, out, steps=8):
    return LocalJob(
        model=str(base),
        assignment=str(assignment),
        data="corpus:math",
        out=str(out),
        train=TrainSettings(
            steps=steps,
            lr=1e-2,
            batch_size=4,  # global: 2 rows per rank at world size 2
            seq_len=64,
            max_tokens=20_000,
            seed=0,
            device="cpu",
            encoding="float32",
        ),
    )


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_gloo_ranks_train_the_single_process_delta(test_base, test_assignment, tmp_path):
    from miner.distributed import run_distributed
    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment
    from protocol.moe.model import expert_layout, load_model

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


def _spied_rank(rank, world_size, job, init_method, out_dir):
    """One rank of the loading test: spy on reads of the weights, load, run one forward."""
    import sys

    import safetensors
    import safetensors.torch
    import torch.distributed as dist
    import transformers.modeling_utils as mu
    from torch.distributed.tensor import DTensor

    from miner.distributed import load_sharded

    reads = []
    # Python-level opens (hashing the checkpoint reads it with open()) ...
    sys.addaudithook(
        lambda event, args: (
            reads.append(f"open {args[0]}")
            if event == "open" and str(args[0]).endswith(".safetensors")
            else None
        )
    )

    # ... and safetensors' Rust reader, which bypasses open(), wherever transformers imports it.
    def spy(name, fn):
        def wrapper(*a, **k):
            reads.append(f"{name} {a[:1]}")
            return fn(*a, **k)

        return wrapper

    for mod in (safetensors, safetensors.torch, mu):
        for name in ("safe_open", "load_file", "load"):
            if hasattr(mod, name):
                setattr(mod, name, spy(f"{mod.__name__}.{name}", getattr(mod, name)))
    orig = mu.PreTrainedModel.from_pretrained.__func__
    mu.PreTrainedModel.from_pretrained = classmethod(spy("from_pretrained", orig))

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        sh = load_sharded(job, rank, world_size, "cpu")
        ids = torch.arange(2 * 16).reshape(2, 16) % 97 + 3
        with torch.no_grad():
            logits = sh.model(input_ids=ids).logits
        deltas = [p.to_local() if isinstance(p, DTensor) else p for p in sh.trainer.parameters()]
        torch.save(
            {
                "reads": reads,
                "meta_before_sync": sh.meta_before_sync,
                "logits": logits,
                "buffers": {n: b.clone() for n, b in sh.model.named_buffers()},
                "delta_abs_sum": float(sum(d.abs().sum() for d in deltas)),
            },
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_only_rank0_reads_the_base_and_rank1_computes_the_same_logits(
    test_base, test_assignment, tmp_path
):
    import torch.multiprocessing as mp

    from protocol.moe.model import load_model

    job = _job(test_base, test_assignment, tmp_path / "unused.safetensors")
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_spied_rank, args=(2, job, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    # The spy sees rank 0 read the checkpoint (so it works) and rank 1 read nothing of it.
    assert any(r.startswith("open ") for r in r0["reads"]), r0["reads"]
    assert any(r.startswith("from_pretrained") for r in r0["reads"]), r0["reads"]
    assert r1["reads"] == [], "rank 1 read the base's weights instead of receiving its shards"
    assert r1["meta_before_sync"] and not r0["meta_before_sync"]

    # Rank 1's model is the base: same logits as a normally loaded copy, same rotary buffers
    # (non-persistent, so not in the broadcast state dict), zero deltas.
    ref = load_model(test_base, experts_implementation="grouped_mm")
    ids = torch.arange(2 * 16).reshape(2, 16) % 97 + 3
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    for r in (r0, r1):
        torch.testing.assert_close(r["logits"], want)
        assert r["delta_abs_sum"] == 0.0
    ref_buffers = dict(ref.named_buffers())
    assert {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} <= set(ref_buffers)
    for name, value in ref_buffers.items():
        assert torch.equal(r1["buffers"][name], value), name
    assert set(r1["buffers"]) == set(r0["buffers"])  # with the parametrizations' expert_ids
    for name, value in r0["buffers"].items():
        assert torch.equal(r1["buffers"][name], value), name


def _catching_rank(rank, world_size, job, init_method, out_dir):
    """One rank of the failed-load test: record the error this rank raises, if any."""
    import torch.distributed as dist

    from miner.distributed import load_sharded

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        load_sharded(job, rank, world_size, "cpu")
        msg = "no error"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.txt").write_text(msg)


def test_a_failed_load_on_rank0_is_raised_on_every_rank(test_base, test_assignment, tmp_path):
    """Rank 0 alone reads the base, so the others must learn that it failed, not wait for it."""
    import dataclasses

    import torch.multiprocessing as mp

    from protocol.moe.experts import Assignment

    # An assignment selected on another base: checked_base refuses it on rank 0.
    wrong = dataclasses.replace(Assignment.load(test_assignment), model_hash="ab" * 32)
    wrong.save(tmp_path / "wrong.json")
    job = _job(test_base, tmp_path / "wrong.json", tmp_path / "unused.safetensors")
    init = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_catching_rank, args=(r, 2, job, init, str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()  # only the processes this test started
    assert [p.exitcode for p in procs] == [0, 0], "a rank hung or crashed"
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert r0.startswith("ValueError: assignment is for base abababab"), r0
    assert r1.startswith("RuntimeError: rank 0 could not load the base: ValueError: assign"), r1


def test_gradient_checkpointing_under_fsdp_trains_the_same_delta(
    test_base, test_assignment, tmp_path
):
    """Activation checkpointing recomputes the forward in backward: same delta on 2 ranks."""
    import dataclasses

    from miner.distributed import run_distributed

    out = {}
    for ckpt in (False, True):
        job = _job(test_base, test_assignment, tmp_path / f"ckpt-{ckpt}.safetensors", steps=4)
        job = dataclasses.replace(
            job, train=dataclasses.replace(job.train, gradient_checkpointing=ckpt)
        )
        rep = tmp_path / f"reports-{ckpt}"
        rep.mkdir()
        run = run_distributed(job, 2, "gloo", port=free_port(), report_dir=rep)
        out[ckpt] = load_file(run["out"])
        for r in range(2):  # the layers really were checkpointing at every step, or never
            steps = json.loads((rep / f"rank{r}.json").read_text())["checkpointed"]
            assert steps == [ckpt] * 4, (ckpt, r, steps)
    assert _max_diff(out[True], out[False]) < ATOL
    assert all(float(t.abs().max()) > 0 for t in out[True].values())


def test_chunked_loss_is_refused_with_several_ranks_before_any_process_starts(
    test_base, test_assignment, tmp_path
):
    import dataclasses

    from miner.distributed import run_distributed

    job = _job(test_base, test_assignment, tmp_path / "x.safetensors")
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, loss_chunk=64))
    with pytest.raises(ValueError, match="loss_chunk .64. is single-process only"):
        run_distributed(job, 2, "gloo", port=free_port())
    assert not (tmp_path / "x.safetensors").exists()
