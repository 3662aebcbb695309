"""One local training job: load base + assignment, train the experts, write the delta file.

A LocalJob is what to train on and where to write it, around the TrainSettings that say how
(protocol/settings.py); `moesaic miner train` and `python -m miner.distributed` make their
flags from these fields (protocol.config.add_flags), so their defaults are these.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from protocol.identity.hashing import sha256_dir
from protocol.moe.experts import Assignment
from protocol.round.shards import UNSHARDED
from protocol.settings import TrainSettings


@dataclass(frozen=True)
class LocalJob:
    """One training job: the base, the experts, the data and the delta file to write."""

    model: str
    """base model directory"""
    assignment: str
    """assignment JSON from `moesaic experts select`"""
    data: str
    """data spec, e.g. corpus:math (its train split is used)"""
    out: str
    """delta .safetensors to write"""
    train: TrainSettings = field(default_factory=TrainSettings)
    """how to train; its seed is used as given (a miner passes its round's seed)"""
    round: int = 0
    """round number recorded in the delta's metadata"""
    assignment_base: str = ""
    """sha256 of the base the assignment was selected on, when `model` is a merged checkpoint
    descended from it (protocol.round.lineage); empty: `model` itself."""
    feedback_dir: str = ""
    """where a lossy encoding's error-feedback residuals are kept across rounds
    (miner/feedback.py); empty: none kept, each delta encoded on its own."""
    optimizer_dir: str = ""
    """where a miner keeps its inner optimizer's state across rounds (train.keep_optimizer,
    miner/optimizer_state.py); empty: a fresh AdamW every job."""
    shard: str = ""
    """the round's shard key (protocol.round.shards.shard_key): the train split is read in
    its order, and the delta declares it; empty: the split's plain order, declared as
    protocol.round.shards.UNSHARDED (a one-off job, which no validator accepts in a round)."""

    def __post_init__(self):
        if not isinstance(self.train, TrainSettings):
            raise ValueError(f"train must be TrainSettings, got {self.train!r}")


# LocalJob fields a miner sets from its lineage and state, not a one-off job's command line.
JOB_INTERNAL = ("assignment_base", "feedback_dir", "optimizer_dir", "shard")


def checked_base(job: LocalJob):
    """(assignment, sha256_dir of the job's model), refusing an assignment selected on another
    base than the job's lineage root (`assignment_base`, else the model itself)."""
    assignment = Assignment.load(job.assignment)
    base_hash = sha256_dir(job.model)
    root = job.assignment_base or base_hash
    if assignment.model_hash != root:
        raise ValueError(
            f"assignment is for base {assignment.model_hash[:16]}, {job.model} is {root[:16]}"
        )
    return assignment, base_hash


def write_job_delta(job: LocalJob, tensors: dict, base_hash: str, assignment, tokens: int) -> str:
    """Write the job's delta with its metadata (round, base, assignment, shard, encoding); sha256.
    With a `feedback_dir`, a lossy encoding also ships what earlier rounds' encodings dropped
    and keeps what this one drops (miner/feedback.py)."""
    from protocol.artifact.delta import DeltaMeta, write_delta  # noqa: PLC0415 (torch; `moesaic --help` imports this module)

    meta = DeltaMeta(
        base_hash=base_hash,
        assignment_hash=assignment.hash(),
        round=job.round,
        tokens=tokens,
        shard=job.shard or UNSHARDED,
        encoding=job.train.encoding,
    )
    if job.feedback_dir:
        from miner.feedback import write_with_feedback  # noqa: PLC0415 (torch; `moesaic --help` imports this module)

        return write_with_feedback(job.feedback_dir, job.out, tensors, meta)
    return write_delta(job.out, tensors, meta)


def progress_logger(steps: int, what: str, every: int | None = None):
    """An on_step callback that logs about ten lines per run (a daemon's progress: its log
    is a file, where a progress bar would be noise): step, mean loss since the last line."""
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


def run_local(job: LocalJob, progress: bool = True, splits: tuple[str, ...] = ("train",)) -> dict:
    """Train and write the delta; return a summary with its sha256 and size. Without a
    progress bar, progress goes to the log (about ten lines). `splits`: the splits of the job's
    data that fill the training pool, in order, up to max_tokens in all (a miner trains on
    "train"; the evalpool cheater puts the public "test" split first, miner/strategies.py)."""
    import torch  # noqa: PLC0415 (torch; `moesaic --help` imports this module)
    from transformers import AutoTokenizer  # noqa: PLC0415 (torch; `moesaic --help` imports this module)

    from miner.teft import train_experts  # noqa: PLC0415 (torch; `moesaic --help` imports this module)
    from protocol.moe.data import batch_stream, load_blocks  # noqa: PLC0415 (torch; `moesaic --help` imports this module)
    from protocol.moe.model import expert_layout, load_model, pick_device  # noqa: PLC0415 (torch; `moesaic --help` imports this module)
    from protocol.moe.train import TrainConfig  # noqa: PLC0415 (torch; `moesaic --help` imports this module)

    s = job.train
    device = pick_device(s.device)
    assignment, base_hash = checked_base(job)
    torch.manual_seed(s.seed)
    model = load_model(job.model, device=device, experts_implementation="grouped_mm")
    layout = expert_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    # One pool size whatever the splits: a cheater's gain then comes from what it trains on,
    # not from having more text than an honest miner with the same settings.
    pool, left = [], s.max_tokens
    for split in splits:
        if left >= s.seq_len:
            pool.append(load_blocks(job.data, split, tokenizer, s.seq_len, left, job.shard))
            left -= pool[-1].numel()
    blocks = torch.cat(pool)
    cfg = TrainConfig.for_job(s, bf16=device.startswith("cuda"))
    keeper = None
    if s.keep_optimizer and not job.optimizer_dir:
        logging.getLogger("moesaic.miner").warning(
            "keep_optimizer: this job has no miner work_dir to keep the optimizer state in; "
            "training with a fresh AdamW"
        )
    if job.optimizer_dir:
        from miner.optimizer_state import OptimizerKeeper  # noqa: PLC0415 (torch; `moesaic --help` imports this module)

        keeper = OptimizerKeeper(Path(job.optimizer_dir), job.round, assignment.hash())
    delta, result = train_experts(
        model,
        layout,
        assignment,
        batch_stream(blocks, s.batch_size, s.seed),
        cfg,
        device=device,
        progress=progress,
        on_step=None if progress else progress_logger(s.steps, f"round {job.round}"),
        keeper=keeper,
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
