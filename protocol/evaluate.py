"""Held-out loss: the pure language-model loss per batch (never the router aux loss)."""

from __future__ import annotations

import torch


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
