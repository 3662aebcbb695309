"""Held-out evaluation shared by validators and the merger.

- `batch_losses`: the pure language-model loss per batch (never the router aux loss).
- `eval_seed`, `build_eval_set`: the round's held-out batches, drawn with a seed that exists
  only once commitments are closed (the commit-deadline block hash), so no miner can pick a
  delta that suits them. The domain batches come from a validator's private held-out text
  (`heldout_blocks`; every document of it) or, where none is configured, from the domain's
  packaged TEST split, which is public: a miner can train on that pool and score more
  (docs/security.md, "training on the evaluation pool").
- `Evaluator`: base losses measured once; each delta added into the one loaded model and
  reverted bit-exactly afterwards (no model copies).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from protocol.artifact.delta import apply_delta
from protocol.moe.data import ALL, load_blocks, sample_batches

if TYPE_CHECKING:
    from torch import nn

    from protocol.moe.model import ExpertLayout


@torch.no_grad()
def batch_losses(model, batches: list[torch.Tensor], device: str = "cpu") -> list[float]:
    """Mean next-token loss of each batch, in order (paired comparisons need per-batch values)."""
    model.eval()
    out = []
    for b in batches:
        b = b.to(device)
        out.append(float(model(input_ids=b, labels=b).loss))
    return out


def mean_loss(model, batches: list[torch.Tensor], device: str = "cpu") -> float:
    losses = batch_losses(model, batches, device)
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- seed


SEED_DOMAIN = "moesaic-eval-seed-v1"  # versioned so a future derivation cannot collide
_HEX = re.compile(r"^[0-9a-f]+$")


def eval_seed(block_hash: str, round: int, task_id: int) -> int:
    """63-bit evaluation seed: sha256 of the commit-deadline block hash, round and task.

    The block hash is normalised (optional 0x, any case) so EVM and substrate spellings of the
    same hash agree. 63 bits keep the seed a non-negative int64 (torch.Generator accepts it).
    """
    h = block_hash.lower().removeprefix("0x") if isinstance(block_hash, str) else ""
    if not _HEX.match(h):
        raise ValueError(f"block hash {block_hash!r} is not a hex string")
    for name, value in (("round", round), ("task_id", task_id)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    digest = hashlib.sha256(f"{SEED_DOMAIN}|{h}|{round}|{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----------------------------------------------------------------------------- eval set


@dataclass(frozen=True)
class EvalSet:
    """The round's held-out batches ([batch_size, seq_len] token ids each), domain and general."""

    seed: int
    domain: tuple[torch.Tensor, ...]
    general: tuple[torch.Tensor, ...]

    def digest(self) -> str:
        """sha256 over the seed and every token: validators can compare eval sets by one hex."""
        h = hashlib.sha256(f"{self.seed}".encode())
        for name, batches in (("domain", self.domain), ("general", self.general)):
            h.update(f"|{name}:{len(batches)}".encode())
            for b in batches:
                h.update(f"|{tuple(b.shape)}".encode())
                h.update(b.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def _draw(blocks: torch.Tensor, batch_size: int, num_batches: int, seed: int, what: str):
    # The paired t bound treats batches as independent samples: a block reused across batches
    # would count twice and overstate the confidence, so refuse rather than wrap around.
    if num_batches < 2:
        raise ValueError(f"{what}: need >= 2 batches for a confidence bound, got {num_batches}")
    need = batch_size * num_batches
    if need > len(blocks):
        raise ValueError(
            f"{what}: {num_batches} batches of {batch_size} need {need} distinct blocks, the "
            f"held-out data gave {len(blocks)}; raise max_tokens, add text or lower the batch "
            "count"
        )
    return tuple(sample_batches(blocks, batch_size, num_batches, seed=seed))


def _without(blocks: torch.Tensor, used: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The blocks whose tokens equal no block of the `used` batches."""
    seen = {row.numpy().tobytes() for batch in used for row in batch}
    keep = [i for i, row in enumerate(blocks) if row.numpy().tobytes() not in seen]
    return blocks[keep]


def heldout_blocks(
    tokenizer, spec: str, *, seq_len: int, max_tokens: int, batch_size: int, domain_batches: int
) -> torch.Tensor:
    """Token blocks of a validator's private held-out source: EVERY document of `spec` (no
    split: none of it is public), refused with an error naming the source when it is missing,
    empty, or too small to draw a round's `domain_batches` distinct batches from."""
    try:
        blocks = load_blocks(spec, ALL, tokenizer, seq_len, max_tokens)
    except FileNotFoundError as e:
        raise ValueError(f"held-out data {spec}: missing ({e})") from None
    except ValueError as e:  # no documents, or not one block of text
        raise ValueError(f"held-out data {spec} is empty or too small: {e}") from None
    need = batch_size * domain_batches
    if len(blocks) < need:
        raise ValueError(
            f"held-out data {spec} is too small: {len(blocks)} blocks of {seq_len} tokens, a "
            f"round draws {domain_batches} batches of {batch_size} = {need} distinct blocks; "
            "add text or lower domain_batches"
        )
    return blocks


def build_eval_set(
    tokenizer,
    domain_spec: str,
    general_specs: list[str],
    seed: int,
    *,
    seq_len: int,
    batch_size: int,
    domain_batches: int,
    general_batches: int,
    max_tokens: int,
    domain_split: str = "test",
    exclude: EvalSet | None = None,
) -> EvalSet:
    """Seeded batches from the TEST split of the domain (or its `domain_split`: ALL for a
    validator's private held-out source) and of the general specs.

    General blocks are the concatenation of each general spec's test blocks (each capped at
    `max_tokens`), so every general batch mixes the general sources. Same inputs and seed ->
    identical batches on every machine (`EvalSet.digest`). `exclude`: another eval set whose
    blocks (by content) are removed from the pools first, so the two sets share no block (the
    merger's guard set, drawn apart from the selection set).
    """
    if not general_specs:
        raise ValueError("at least one general data spec is needed for the forgetting guard")
    domain = load_blocks(domain_spec, domain_split, tokenizer, seq_len, max_tokens)
    general = torch.cat(
        [load_blocks(s, "test", tokenizer, seq_len, max_tokens) for s in general_specs]
    )
    if exclude is not None:
        domain, general = _without(domain, exclude.domain), _without(general, exclude.general)
    return EvalSet(
        seed=seed,
        domain=_draw(domain, batch_size, domain_batches, seed, f"domain {domain_spec}"),
        general=_draw(general, batch_size, general_batches, seed, "general"),
    )


# ----------------------------------------------------------------------------- evaluator


class Evaluator:
    """Per-batch losses of the base (measured once) and of the base plus one delta at a time.

    The model is modified in place while a delta is evaluated and restored bit-exactly after,
    even when the evaluation raises (`apply_delta` checks every key before writing anything).
    """

    def __init__(
        self, model: nn.Module, layout: ExpertLayout, eval_set: EvalSet, device: str = "cpu"
    ):
        self.model = model
        self.layout = layout
        self.eval_set = eval_set
        self.device = device
        self.base_domain = self._losses(eval_set.domain)
        self.base_general = self._losses(eval_set.general)
        for name, losses in (("domain", self.base_domain), ("general", self.base_general)):
            if not all(math.isfinite(x) for x in losses):
                # The validator's own setup is broken; no miner should be scored against it.
                raise ValueError(f"base {name} loss is non-finite: {losses}")

    def _losses(self, batches: tuple[torch.Tensor, ...]) -> list[float]:
        return batch_losses(self.model, list(batches), self.device)

    def evaluate(self, tensors: Mapping[str, torch.Tensor]) -> tuple[list[float], list[float]]:
        """(domain losses, general losses) per batch with the delta added; the model is reverted."""
        applied = apply_delta(self.model, self.layout, tensors)  # a WireDelta stays lazy
        try:
            return self._losses(self.eval_set.domain), self._losses(self.eval_set.general)
        finally:
            applied.revert()
