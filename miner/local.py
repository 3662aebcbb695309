"""One local training job: load base + assignment, train the experts, write the delta file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalJob:
    model: str
    assignment: str
    data: str
    out: str
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 128
    max_tokens: int = 2_000_000
    round: int = 0
    seed: int = 0
    device: str = "auto"
    encoding: str = "float32"
    assignment_base: str = ""
    """sha256 of the base the assignment was selected on, when `model` is a merged checkpoint
    descended from it (protocol.round.lineage); empty: `model` itself."""
    feedback_dir: str = ""
    """where a lossy encoding's error-feedback residuals are kept across rounds
    (miner/feedback.py); empty: none kept, each delta encoded on its own."""
    gradient_checkpointing: bool = False
    loss_chunk: int = 0  # tokens per LM-head/loss chunk; 0: the whole batch at once

    def __post_init__(self):
        if self.batch_size <= 0 or self.seq_len <= 0 or self.max_tokens <= 0:
            raise ValueError("batch size, sequence length and token budget must be positive")


def checked_base(job: LocalJob):
    """(assignment, sha256_dir of the job's model), refusing an assignment selected on another
    base than the job's lineage root (`assignment_base`, else the model itself)."""
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment

    assignment = Assignment.load(job.assignment)
    base_hash = sha256_dir(job.model)
    root = job.assignment_base or base_hash
    if assignment.model_hash != root:
        raise ValueError(
            f"assignment is for base {assignment.model_hash[:16]}, {job.model} is {root[:16]}"
        )
    return assignment, base_hash


def write_job_delta(job: LocalJob, tensors: dict, base_hash: str, assignment, tokens: int) -> str:
    """Write the job's delta with its metadata (round, base, assignment, encoding); sha256.
    With a `feedback_dir`, a lossy encoding also ships what earlier rounds' encodings dropped
    and keeps what this one drops (miner/feedback.py)."""
    from protocol.artifact.delta import DeltaMeta, write_delta

    meta = DeltaMeta(
        base_hash=base_hash,
        assignment_hash=assignment.hash(),
        round=job.round,
        tokens=tokens,
        encoding=job.encoding,
    )
    if job.feedback_dir:
        from miner.feedback import write_with_feedback

        return write_with_feedback(job.feedback_dir, job.out, tensors, meta)
    return write_delta(job.out, tensors, meta)


def progress_logger(steps: int, what: str, every: int | None = None):
    """An on_step callback that logs about ten lines per run (a daemon's progress: its log
    is a file, where a progress bar would be noise): step, mean loss since the last line."""
    import logging

    log = logging.getLogger("moesaic.miner")
    every = every or max(1, steps // 10)
    window: list[float] = []

    def on_step(step: int, loss: float) -> None:
        window.append(loss)
        if (step + 1) % every == 0 or step + 1 == steps:
            mean = sum(window) / len(window)
            log.info("%s: step %d/%d, train loss %.4f", what, step + 1, steps, mean)
            window.clear()

    return on_step


def run_local(job: LocalJob, progress: bool = True) -> dict:
    """Train and write the delta; return a summary with its sha256 and size. Without a
    progress bar, progress goes to the log (about ten lines)."""
    import torch
    from transformers import AutoTokenizer

    from miner.teft import train_experts
    from protocol.moe.data import batch_stream, load_blocks
    from protocol.moe.model import expert_layout, load_model, pick_device
    from protocol.moe.train import TrainConfig

    device = pick_device(job.device)
    assignment, base_hash = checked_base(job)
    torch.manual_seed(job.seed)
    model = load_model(job.model, device=device, experts_implementation="grouped_mm")
    layout = expert_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    blocks = load_blocks(job.data, "train", tokenizer, job.seq_len, job.max_tokens)
    cfg = TrainConfig(
        steps=job.steps,
        lr=job.lr,
        warmup=max(1, job.steps // 10),
        bf16=device.startswith("cuda"),
        gradient_checkpointing=job.gradient_checkpointing,
        loss_chunk=job.loss_chunk,
    )
    delta, result = train_experts(
        model,
        layout,
        assignment,
        batch_stream(blocks, job.batch_size, job.seed),
        cfg,
        device=device,
        progress=progress,
        on_step=None if progress else progress_logger(job.steps, f"round {job.round}"),
    )
    digest = write_job_delta(job, delta, base_hash, assignment, result.tokens)
    return {
        "out": job.out,
        "sha256": digest,
        "bytes": Path(job.out).stat().st_size,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
    }
