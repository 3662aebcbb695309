"""Data-parallel TEFT over several processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

For a base that does not fit one GPU. Every rank runs the same `train_loop` as `run_local`; what
differs is how the model is laid out and which rows of the batch a rank sees:

- The base is loaded on the CPU, `ExpertTrainer.attach()` registers the `W + scatter(delta)`
  parametrizations, and only then is the model sharded: `fully_shard` on every decoder layer
  and once on the root (embeddings, final norm, the tied head). Sharding after attaching is the
  arrangement that works with torch.nn.utils.parametrize: FSDP2 swaps a module's registered
  parameters for DTensor shards in place, and both the frozen fused tensor
  (`parametrizations.gate_up_proj.original`) and the trainable `delta [S, ...]` are ordinary
  registered parameters of the layer, so they are sharded on dim 0 like everything else. Inside
  a layer's forward FSDP2 has all-gathered plain tensors back into those slots, so the
  parametrization computes `W + index_add(delta)` on full tensors exactly as on one process.
  (Attaching after sharding would hand `register_parametrization` a DTensor and make
  `index_add` mix DTensors with the plain `expert_ids` buffer; keeping experts unsharded would
  replicate the largest tensors of an MoE, which defeats the purpose.)
- Frozen tensors never get a gradient, so FSDP2 reduce-scatters only the deltas' gradients
  (averaged over ranks). AdamW is built on the deltas alone, so its state is the deltas' shards:
  each rank holds ~1/world of the optimizer state of the selected experts and nothing for the
  rest of the model. Uneven shards (S=2 experts on 3 ranks) are padded by FSDP2 itself.
- Data parallelism: every rank draws the same global batch stream (same seed) and keeps rows
  [rank*B/W, (rank+1)*B/W). With equal-length blocks every rank's mean token loss covers the
  same number of tokens, so the average of the ranks' gradients equals the gradient of the
  global batch: world size W trains the same delta as world size 1, up to float rounding.
- The base is materialised on each rank's CPU before sharding (safetensors are memory-mapped);
  only the shards move to the accelerator. Loading straight into shards from a meta-device
  model is the next step for bases larger than host RAM.

Rank 0 gathers the full deltas (`unshard()`, so `ExpertTrainer.delta()` reads plain tensors) and
writes them with `protocol.delta.write_delta` exactly as `run_local` does.

Entry points: `run_distributed(job, world_size)` spawns the ranks on this host
(torch.multiprocessing, a rendezvous on 127.0.0.1); `python -m miner.distributed ...` is the
same job under `torchrun` (env:// rendezvous, LOCAL_RANK picks the GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from miner.local import LocalJob


def _rank_batches(stream, rank: int, world_size: int):
    """This rank's rows of every global batch (the global stream is identical on all ranks)."""
    for batch in stream:
        per = batch.shape[0] // world_size
        yield batch[rank * per : (rank + 1) * per]


def _digest(t) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _local_shard_digests(model, rank: int, world_size: int, frozen: dict[str, object]):
    """sha256 of the dim-0 chunk of each frozen tensor that FSDP2 gives this rank
    (torch.chunk semantics), computed before sharding, so no copy of the base is kept."""
    import torch

    out = {}
    for name, p in frozen.items():
        chunks = torch.chunk(p.detach(), world_size, dim=0)
        out[name] = _digest(chunks[rank]) if rank < len(chunks) else _digest(p[:0])
    return out


def _train_rank(
    rank: int,
    world_size: int,
    job: LocalJob,
    backend: str,
    init_method: str,
    report_dir: str | None,
    progress: bool,
) -> dict | None:
    """One rank's whole job; returns rank 0's summary (None elsewhere)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoTokenizer

    from miner.local import checked_base, progress_logger, write_job_delta
    from miner.teft import ExpertTrainer
    from protocol.data import batch_stream, load_blocks
    from protocol.model import expert_layout, load_model, pick_device
    from protocol.train import TrainConfig, train_loop

    if job.batch_size % world_size:
        raise ValueError(f"batch size {job.batch_size} is not divisible by {world_size} ranks")
    device = pick_device(job.device)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    else:
        # Ranks share the host's cores: oversubscribed threads slow every rank down.
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_host))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        assignment, base_hash = checked_base(job)
        torch.manual_seed(job.seed)
        model = load_model(job.model, device="cpu", experts_implementation="grouped_mm")
        layout = expert_layout(model)
        frozen = dict(model.named_parameters())
        expected = _local_shard_digests(model, rank, world_size, frozen) if report_dir else {}

        trainer = ExpertTrainer(model, layout, assignment)
        n_deltas = len(trainer.attach())
        layers = model.get_submodule(layout.prefix)
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        model.to(device)
        # fully_shard replaced the delta parameters with DTensor shards: optimise those.
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == n_deltas, "FSDP2 must keep one trainable tensor per delta"

        tokenizer = AutoTokenizer.from_pretrained(job.model)
        blocks = load_blocks(job.data, "train", tokenizer, job.seq_len, job.max_tokens)
        cfg = TrainConfig(
            steps=job.steps,
            lr=job.lr,
            warmup=max(1, job.steps // 10),
            bf16=device.startswith("cuda"),
        )
        log = None if progress else progress_logger(job.steps, f"round {job.round}")
        global_losses: list[float] = []

        def on_step(step: int, loss: float) -> None:
            # The global batch's loss: the mean of the ranks' equal-sized shares.
            t = torch.tensor([loss], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            global_losses.append(float(t) / world_size)
            if log and rank == 0:
                log(step, global_losses[-1])

        result = train_loop(
            model,
            params,
            _rank_batches(batch_stream(blocks, job.batch_size, job.seed), rank, world_size),
            cfg,
            device=device,
            desc=f"teft rank {rank}",
            progress=progress and rank == 0,
            step_context=trainer.step_context,
            on_step=on_step,
        )

        if report_dir:
            # Every rank checks its own shards of the frozen tensors against the loaded base.
            now = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    continue
                local = p.to_local() if isinstance(p, DTensor) else p
                now[name.replace("parametrizations.", "").replace(".original", "")] = _digest(local)
            report = {
                "rank": rank,
                "frozen_unchanged": {k: now.get(k) == v for k, v in expected.items()},
                "optimizer_numel": sum(
                    (p.to_local() if isinstance(p, DTensor) else p).numel() for p in params
                ),
                "losses": global_losses,
            }
            Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))

        # Gather the full deltas (every rank takes part in the all-gather), read them back
        # through ExpertTrainer.delta() on plain tensors, write on rank 0 only.
        for module in [*layers, model]:
            module.unshard()
        # delta() returns views of the gathered storage, which reshard() frees: copy first.
        delta = {k: v.clone() for k, v in trainer.delta().items()}
        for module in [*layers, model]:
            module.reshard()
        summary = None
        if rank == 0:
            tokens = result.tokens * world_size
            digest = write_job_delta(job, delta, base_hash, assignment, tokens)
            summary = {
                "out": job.out,
                "sha256": digest,
                "bytes": Path(job.out).stat().st_size,
                "tokens": tokens,
                "tokens_per_s": result.tokens_per_s * world_size,
                "first_loss": global_losses[0],
                "last_loss": global_losses[-1],
                "world_size": world_size,
            }
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def _spawned(rank, world_size, job, backend, init_method, report_dir, progress, out_dir):
    summary = _train_rank(rank, world_size, job, backend, init_method, report_dir, progress)
    if summary is not None:
        Path(out_dir, "summary.json").write_text(json.dumps(summary))


def run_distributed(
    job: LocalJob,
    world_size: int,
    backend: str = "gloo",
    *,
    port: int | None = None,
    report_dir: str | None = None,
    progress: bool = False,
) -> dict:
    """Train `job` on `world_size` processes of this host; return the summary `run_local`
    returns (tokens are global). `report_dir` gets one JSON per rank (frozen-shard check,
    optimizer size, global losses) for tests and diagnostics."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError("world size must be at least 1")
    if port is None:
        from moesaic.devnet.procs import free_port

        port = free_port()
    init_method = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="moesaic-dist-") as tmp:
        mp.spawn(
            _spawned,
            args=(world_size, job, backend, init_method, report_dir, progress, tmp),
            nprocs=world_size,
            join=True,
        )
        return json.loads(Path(tmp, "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m miner.distributed --model ... --out ...`"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m miner.distributed", description=main.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--assignment", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (all ranks)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=2_000_000)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--encoding", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--backend", default=None, help="default: nccl on GPU, gloo on CPU")
    a = p.parse_args(argv)
    job = LocalJob(
        model=a.model,
        assignment=a.assignment,
        data=a.data,
        out=a.out,
        steps=a.steps,
        lr=a.lr,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        max_tokens=a.max_tokens,
        round=a.round,
        seed=a.seed,
        device=a.device,
        encoding=a.encoding,
    )
    from protocol.model import pick_device

    backend = a.backend or ("nccl" if pick_device(a.device).startswith("cuda") else "gloo")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500")
        )
    summary = _train_rank(rank, world, job, backend, "env://", None, progress=False)
    if summary:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
