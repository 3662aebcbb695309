"""Settings groups more than one role or tool shares, each written once: TrainSettings (how a
delta is trained: the miner's `[miner.train]`, `moesaic miner train`'s flags, LocalJob, the
training loop) and EvalSettings (how a delta is fetched and measured: the flat evaluation keys of
`[validator]` and `[merger]`).

Torch-free plain frozen dataclasses, validated at construction; every field has a docstring,
which protocol.config turns into CLI help (`add_flags`). A bad value names its key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.artifact.encodings import ENCODING_HELP, is_encoding
from protocol.round.manifest import MAX_JSON_BYTES
from protocol.round.scoring import DEFAULT_CONFIDENCE


@dataclass(frozen=True)
class TrainSettings:
    """How a miner trains (the same for every round; the miner mixes the round into the seed)."""

    steps: int = 100
    """optimizer steps per round (inner steps H)"""
    lr: float = 1e-3
    """peak AdamW learning rate"""
    batch_size: int = 8
    """sequences per step (the global batch, over all ranks)"""
    seq_len: int = 128
    """tokens per sequence"""
    max_tokens: int = 2_000_000
    """tokens read from the data's train split (the pool batches are drawn from)"""
    seed: int = 0
    """base seed; a miner trains round r with round_seed(seed, r) so rounds differ"""
    device: str = "auto"
    """torch device: cpu, cuda, cuda:N, or "auto" (cuda when available)"""
    encoding: str = "bfloat16"
    """wire encoding of the shipped delta: float32, bfloat16, float16, int8, lowrank<R> or
    lowrank<R>-int8 (bfloat16: half float32's bytes, the whole improvement kept, docs/bench.md
    section 6); a miner keeps lossy ones' error-feedback residual in rounds/ (miner/feedback.py)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in backward (less memory, ~20 % slower)"""
    loss_chunk: int = 0
    """tokens per LM-head + loss chunk, so the [tokens, vocab] logits never exist at once;
    0: whole batch (single process only)"""
    keep_optimizer: bool = False
    """carry the inner AdamW state (its moment estimates) from one round to the next: a miner
    saves it under its work_dir after training each round (rounds/optimizer.<round>.pt,
    written atomically) and starts the next round from it when the trained parameters' shapes
    and the assignment match (else from a fresh AdamW, logged). Costs 2x the trained experts'
    float32 bytes on disk; single process only; a one-off job has nowhere to keep it"""

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "max_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lr, int | float) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"train.lr must be a positive finite number, got {self.lr!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"train.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"train.device must be a device name or 'auto', got {self.device!r}")
        for name in ("gradient_checkpointing", "keep_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false")
        if not _is_int(self.loss_chunk) or self.loss_chunk < 0:
            raise ValueError(
                f"train.loss_chunk must be a non-negative integer, got {self.loss_chunk!r}"
            )
        if not is_encoding(self.encoding):
            raise ValueError(f"train.encoding {self.encoding!r} unknown; one of {ENCODING_HELP}")


# The EvalSettings fields that size the held-out eval set (protocol.moe.evaluate.build_eval_set).
EVAL_SET_SIZES = ("seq_len", "batch_size", "domain_batches", "general_batches", "max_tokens")


@dataclass(frozen=True)
class EvalSettings:
    """How validators and the merger fetch and measure a delta. Validators of one network should
    agree on these (with other batches or thresholds they measure other things and their weights
    diverge), and the merger's should match theirs so its guard measures on the batches the
    scores came from."""

    domain_batches: int = 24
    """Held-out domain batches per round (>= 2: the confidence bound needs a variance)."""
    general_batches: int = 24
    """Held-out general batches per round, for the forgetting guard (>= 2)."""
    seq_len: int = 256
    """Tokens per evaluation sequence."""
    batch_size: int = 8
    """Sequences per evaluation batch."""
    max_tokens: int = 200_000
    """Test-split tokens read per data spec to draw the batches from."""
    general_tolerance: float = 0.05
    """Largest general-loss rise (nats/batch, upper confidence bound) a delta may cause: to earn
    a score (validator), to be published (merger)."""
    confidence: float = DEFAULT_CONFIDENCE
    """One-sided confidence level of the score's and the guard's bounds, in [0.5, 1)."""
    max_artifact_bytes: int = 1 << 30
    """Largest delta artifact fetched (and the manifest's artifact_size cap)."""
    max_manifest_bytes: int = MAX_JSON_BYTES
    """Largest signed manifest fetched; the parser refuses more than MAX_JSON_BYTES anyway."""
    device: str = "cpu"
    """torch device the base model is evaluated on."""

    def __post_init__(self):
        minimums = dict(domain_batches=2, general_batches=2, seq_len=1, batch_size=1)
        minimums.update(max_tokens=1, max_artifact_bytes=1, max_manifest_bytes=1)
        for name, low in minimums.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_manifest_bytes > MAX_JSON_BYTES:
            raise ValueError(f"max_manifest_bytes over {MAX_JSON_BYTES}: no manifest parses")
        check_ranges(
            self,
            general_tolerance=(lambda x: x >= 0, "finite and >= 0"),
            confidence=(lambda x: 0.5 <= x < 1, "in [0.5, 1)"),
        )
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a torch device name, got {self.device!r}")

    def eval_set_sizes(self) -> dict[str, int]:
        """The keyword arguments build_eval_set takes from these settings."""
        return {name: getattr(self, name) for name in EVAL_SET_SIZES}


def check_ranges(obj, **ranges) -> None:
    """Each named float field of `obj` is a finite number passing its (test, description)."""
    for name, (ok, what) in ranges.items():
        value = getattr(obj, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} must be {what}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
