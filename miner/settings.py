"""How a miner trains each round: `[miner.train]` in a role's TOML (protocol.config).

Validated at construction (a bad value names its `train.` key); `moesaic miner run --config F
--dry-run` prints the resolved values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.artifact.encodings import ENCODING_HELP, is_encoding


@dataclass(frozen=True)
class TrainSettings:
    """How the miner trains each round (the same for every round; the seed is mixed per round)."""

    steps: int = 100
    """optimizer steps per round"""
    lr: float = 1e-3
    """peak AdamW learning rate"""
    batch_size: int = 8
    """sequences per step"""
    seq_len: int = 128
    """tokens per sequence"""
    max_tokens: int = 2_000_000
    """tokens read from the data's train split (the pool batches are drawn from)"""
    seed: int = 0
    """base seed; round r trains with round_seed(seed, r) so rounds differ"""
    device: str = "auto"
    """torch device, or "auto" (cuda when available)"""
    encoding: str = "bfloat16"
    """wire encoding of the shipped delta: float32, bfloat16, float16, int8, lowrank<R> or
    lowrank<R>-int8 (bfloat16: half float32's bytes, the whole improvement kept, docs/bench.md
    section 6); lossy ones keep an error-feedback residual in rounds/ (miner/feedback.py)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in backward (less memory, ~20 % slower)"""
    loss_chunk: int = 0
    """tokens per LM-head + loss chunk, so the [tokens, vocab] logits never exist at once;
    0: whole batch"""

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lr, int | float) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"train.lr must be a positive finite number, got {self.lr!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"train.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"train.device must be a device name or 'auto', got {self.device!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError("train.gradient_checkpointing must be true or false")
        if (
            not isinstance(self.loss_chunk, int)
            or isinstance(self.loss_chunk, bool)
            or self.loss_chunk < 0
        ):
            raise ValueError(
                f"train.loss_chunk must be a non-negative integer, got {self.loss_chunk!r}"
            )
        if not is_encoding(self.encoding):
            raise ValueError(f"train.encoding {self.encoding!r} unknown; one of {ENCODING_HELP}")
