"""Data-parallel TEFT over several processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

For a base that does not fit one GPU. Every rank runs the same `train_loop` as `run_local`; what
differs is how the model is laid out and which rows of the batch a rank sees:

- Loading: only rank 0 reads the checkpoint (and hashes it for `checked_base`); every other
  rank builds the same model on the meta device from config.json, so a host holds one copy of
  the base, not one per rank. Every rank then runs `ExpertTrainer.attach()` and only then shards
  the model: `fully_shard` on every decoder layer and once on the root (embeddings, final norm,
  the tied head). Rank 0 broadcasts its state dict one tensor at a time
  (`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`) into the shards the
  meta ranks allocated with `to_empty`; each rank keeps its dim-0 slice. Non-persistent buffers
  are in no state dict (rotary `inv_freq`, the trainer's expert indices): rank 0 sends them
  separately, else the meta ranks would run on uninitialised memory.
- Attach, then shard: the trainer's deltas and index tensors are ordinary registered
  parameters and buffers of each trained experts module, and the frozen fused tensors stay
  registered parameters, so FSDP2 shards the deltas on dim 0 with everything else (optimizer
  state split across ranks) and, inside a layer's forward, has all-gathered plain tensors back
  into those slots: the experts forward computes on full tensors exactly as on one process.
  Keeping experts unsharded would replicate the largest tensors of an MoE instead.
- Frozen tensors never get a gradient, so FSDP2 reduce-scatters only the deltas' gradients
  (averaged over ranks). AdamW is built on the deltas alone, so its state is the deltas' shards:
  each rank holds ~1/world of the optimizer state of the selected experts and nothing for the
  rest of the model. Uneven shards (S=2 experts on 3 ranks) are padded by FSDP2 itself.
- Data parallelism: every rank draws the same global batch stream (same seed) and keeps rows
  [rank*B/W, (rank+1)*B/W). With equal-length blocks every rank's mean token loss covers the
  same number of tokens, so the average of the ranks' gradients equals the gradient of the
  global batch: world size W trains the same delta as world size 1, up to float rounding.
- Host memory: rank 0 peaks at what `load_model` takes for the full base and frees it once the
  shards are out; the other ranks hold their shards plus one broadcast tensor at a time (the
  largest: one layer's fused experts). Each rank logs its loading mode and peak RSS. The other
  ranks wait for rank 0's hash-and-load on a gloo group with a long timeout
  (`BASE_LOAD_TIMEOUT_S`: a large base from a slow disk can outlast nccl's 10-minute collective
  timeout); a failed load is sent to them, and they raise instead of waiting.

Rank 0 gathers the full deltas (`unshard()`, so `ExpertTrainer.delta()` reads plain tensors) and
writes them with `protocol.artifact.delta.write_delta` exactly as `run_local` does.

Entry points: `run_distributed(job, world_size)` spawns the ranks on this host
(torch.multiprocessing, a rendezvous on 127.0.0.1); `python -m miner.distributed ...` is the
same job under `torchrun` (env:// rendezvous, LOCAL_RANK picks the GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from miner.local import JOB_INTERNAL, LocalJob, checked_base, progress_logger, write_job_delta
from miner.teft import ExpertTrainer
from protocol.config import add_flags, from_flags
from protocol.moe.data import batch_stream, load_blocks
from protocol.moe.model import expert_layout, load_model, pick_device
from protocol.moe.train import TrainConfig, checkpointing_layers, train_loop
from protocol.ops.net import free_port


def _rank_batches(stream, rank: int, world_size: int):
    """This rank's rows of every global batch (the global stream is identical on all ranks)."""
    for batch in stream:
        per = batch.shape[0] // world_size
        yield batch[rank * per : (rank + 1) * per]


def _digest(t) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _shard_digests(frozen: dict[str, object], world_size: int) -> list[dict[str, str]]:
    """For every rank, the sha256 of the dim-0 chunk of each frozen tensor that FSDP2 gives it
    (torch.chunk semantics), computed on rank 0's loaded base before sharding."""
    out: list[dict[str, str]] = [{} for _ in range(world_size)]
    for name, p in frozen.items():
        chunks = torch.chunk(p.detach(), world_size, dim=0)
        for rank in range(world_size):
            out[rank][name] = _digest(chunks[rank]) if rank < len(chunks) else _digest(p[:0])
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _meta_model(source: str, dtype, experts_implementation: str | None):
    """The model rank 0's `load_model` returned (same dtype and expert kernels), with every
    parameter and buffer on the meta device: built from config.json, no weight file read."""
    config = AutoConfig.from_pretrained(source)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)


# How long the other ranks wait for rank 0 to hash and load the base (a 61 GB checkpoint from a
# slow disk can take longer than nccl's 10-minute default collective timeout).
BASE_LOAD_TIMEOUT_S = 2 * 3600


@dataclass
class Sharded:
    """One rank's FSDP2-sharded model with the assignment's deltas attached."""

    model: object
    layers: object  # the decoder layers (each its own FSDP2 unit)
    trainer: object  # miner.teft.ExpertTrainer
    n_deltas: int
    assignment: object
    base_hash: str
    expected_digests: dict[str, str]  # this rank's frozen shards as loaded (if asked for)
    meta_before_sync: bool  # every base parameter was on the meta device (no weight read)


def load_sharded(
    job: LocalJob, rank: int, world_size: int, device: str, *, shard_digests: bool = False
) -> Sharded:
    """Rank 0 loads the base and broadcasts it; the other ranks build on meta and receive their
    shards. Collective: every rank of the default process group calls it."""
    log = logging.getLogger("moesaic.miner")
    who = f"rank {rank}/{world_size}"
    ctrl = dist.new_group(backend="gloo", timeout=timedelta(seconds=BASE_LOAD_TIMEOUT_S))

    # 1. Rank 0 checks the assignment against the base's hash and loads it; the others wait for
    # the outcome (a failure there is raised everywhere instead of hanging in a collective).
    model, error, status = None, None, [None]
    if rank == 0:
        log.info("%s: loading base from %s, broadcasting", who, job.model)
        try:
            assignment, base_hash = checked_base(job)
            model = load_model(job.model, device="cpu", experts_implementation="grouped_mm")
            impl = getattr(model.config, "_experts_implementation", None)
            build = (next(model.parameters()).dtype, impl)
            status = [(None, assignment, base_hash, build)]
        except Exception as e:
            error = e
            status = [(f"{type(e).__name__}: {e}", None, None, None)]
    dist.broadcast_object_list(status, src=0, group=ctrl)
    failure, assignment, base_hash, build = status[0]
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"rank 0 could not load the base: {failure}")
    if rank != 0:
        log.info("%s: building on meta, receiving shards from rank 0", who)
        model = _meta_model(job.model, *build)

    # 2. The same module tree everywhere: attach the deltas, then shard.
    layout = expert_layout(model)
    trainer = ExpertTrainer(model, layout, assignment)
    frozen = dict(model.named_parameters())
    meta_before_sync = all(p.is_meta for p in frozen.values())
    n_deltas = len(trainer.attach())
    full_sd, digests, buffers = {}, [None], [None]
    if rank == 0:
        full_sd = model.state_dict()  # plain references to the loaded tensors, no copy
        if shard_digests:
            digests = [_shard_digests(frozen, world_size)]
        persistent = set(full_sd)
        buffers = [{n: b.detach().cpu() for n, b in model.named_buffers() if n not in persistent}]
    del frozen
    layers = model.get_submodule(layout.prefix)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    if rank == 0:
        model.to(device)
    else:
        model.to_empty(device=device)  # uninitialised shards, filled by the broadcast below

    # 3. Every tensor of the state dict, one at a time from rank 0; each rank keeps its slice.
    set_model_state_dict(
        model,
        full_sd,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    del full_sd
    # Non-persistent buffers (rotary inv_freq, expert_ids) are in no state dict: send them too.
    dist.broadcast_object_list(buffers, src=0, group=ctrl)
    if shard_digests:
        dist.broadcast_object_list(digests, src=0, group=ctrl)
    if rank != 0:
        for name, value in buffers[0].items():
            buf = model.get_buffer(name)
            if buf.shape != value.shape or buf.dtype != value.dtype:
                raise RuntimeError(
                    f"{who}: buffer {name} is {tuple(buf.shape)} {buf.dtype} here, "
                    f"{tuple(value.shape)} {value.dtype} on rank 0"
                )
            buf.copy_(value)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_meta:
            raise RuntimeError(f"{who}: {name} is still on the meta device after the broadcast")
    log.info("%s: base sharded, peak RSS so far %.0f MiB", who, peak_rss_mib())
    return Sharded(
        model=model,
        layers=layers,
        trainer=trainer,
        n_deltas=n_deltas,
        assignment=assignment,
        base_hash=base_hash,
        expected_digests=digests[0][rank] if shard_digests else {},
        meta_before_sync=meta_before_sync,
    )


def check_job(job: LocalJob, world_size: int) -> None:
    """What a data-parallel job cannot do, as a clear error."""
    if world_size < 1:
        raise ValueError("world size must be at least 1")
    s = job.train
    if s.batch_size % world_size:
        raise ValueError(f"batch size {s.batch_size} is not divisible by {world_size} ranks")
    if s.loss_chunk and world_size > 1:
        # The chunked loss reads the LM head's weight outside the model's forward, where FSDP2
        # holds only this rank's shard of it.
        raise ValueError(
            f"loss_chunk ({s.loss_chunk}) is single-process only: with {world_size} ranks "
            "use loss_chunk = 0 (each rank's logits are already 1/world of the batch's)"
        )
    if job.optimizer_dir:
        # Each rank's AdamW holds its FSDP2 shard of the moments; kept state is one process's.
        raise ValueError("keep_optimizer is single-process only: set it to false here")


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
    check_job(job, world_size)
    s = job.train
    device = pick_device(s.device)
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
        torch.manual_seed(s.seed)
        sh = load_sharded(job, rank, world_size, device, shard_digests=report_dir is not None)
        model, layers, trainer = sh.model, sh.layers, sh.trainer
        # fully_shard replaced the delta parameters with DTensor shards: optimise those.
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == sh.n_deltas, "FSDP2 must keep one trainable tensor per delta"
        tokenizer = AutoTokenizer.from_pretrained(job.model)
        blocks = load_blocks(job.data, "train", tokenizer, s.seq_len, s.max_tokens)
        # FSDP2 shards the LM head's weight, which the chunked loss reads outside the model's
        # forward: the loop uses the model's own loss here (check_job refuses it for > 1 rank).
        cfg = TrainConfig.for_job(replace(s, loss_chunk=0), bf16=device.startswith("cuda"))
        log = None if progress else progress_logger(s.steps, f"round {job.round}")
        global_losses: list[float] = []
        checkpointed: list[bool] = []  # per step: were the decoder layers checkpointing?

        def on_step(step: int, loss: float) -> None:
            checkpointed.append(any(m.gradient_checkpointing for m in checkpointing_layers(model)))
            # The global batch's loss: the mean of the ranks' equal-sized shares.
            t = torch.tensor([loss], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            global_losses.append(float(t) / world_size)
            if log and rank == 0:
                log(step, global_losses[-1])

        result = train_loop(
            model,
            params,
            _rank_batches(batch_stream(blocks, s.batch_size, s.seed), rank, world_size),
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
                "frozen_unchanged": {k: now.get(k) == v for k, v in sh.expected_digests.items()},
                "optimizer_numel": sum(
                    (p.to_local() if isinstance(p, DTensor) else p).numel() for p in params
                ),
                "losses": global_losses,
                "checkpointed": checkpointed,
                "meta_before_sync": sh.meta_before_sync,
                "peak_rss_mib": peak_rss_mib(),
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
            digest = write_job_delta(job, delta, sh.base_hash, sh.assignment, tokens)
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
        logging.getLogger("moesaic.miner").info(
            "rank %d/%d: done, peak RSS %.0f MiB", rank, world_size, peak_rss_mib()
        )
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def _log_to_stderr(level: int) -> None:
    """A spawned or torchrun rank starts with logging unconfigured: log like `moesaic run`."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )


def _spawned(rank, world_size, job, backend, init_method, report_dir, progress, out_dir, log_level):
    _log_to_stderr(log_level)
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
    check_job(job, world_size)  # before any process starts
    if port is None:
        port = free_port()
    init_method = f"tcp://127.0.0.1:{port}"
    # Interactive runs show each rank's loading mode and peak RSS; quiet ones log as this
    # process does (nothing below WARNING unless the caller configured logging).
    level = logging.INFO if progress else logging.getLogger("moesaic.miner").getEffectiveLevel()
    with tempfile.TemporaryDirectory(prefix="moesaic-dist-") as tmp:
        mp.spawn(
            _spawned,
            args=(world_size, job, backend, init_method, report_dir, progress, tmp, level),
            nprocs=world_size,
            join=True,
        )
        return json.loads(Path(tmp, "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m miner.distributed --model ... --out ...`"""
    p = argparse.ArgumentParser(prog="python -m miner.distributed", description=main.__doc__)
    add_flags(p, LocalJob, exclude=JOB_INTERNAL)
    p.add_argument("--backend", default=None, help="default: nccl on GPU, gloo on CPU")
    a = p.parse_args(argv)
    try:
        job = from_flags(LocalJob, a)
    except ValueError as e:
        p.error(str(e))
    backend = a.backend or ("nccl" if pick_device(a.device).startswith("cuda") else "gloo")
    _log_to_stderr(logging.INFO)
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
