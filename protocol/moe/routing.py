"""Routing statistics from forward hooks on each MoE layer's router.

Every supported router's forward returns (logits, top-k weights, top-k indices), including
DeepSeek-V3's sigmoid/grouped routers whose logits alone do not reproduce the choice, so the
hook records the experts actually chosen and their weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from protocol.moe.experts import gate_score, token_ratio
from protocol.moe.model import ExpertLayout, router


@dataclass
class RoutingStats:
    """Per layer: tokens seen, times each expert was chosen, summed routing weight."""

    num_experts: int
    top_k: int
    tokens: dict[int, int] = field(default_factory=dict)
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, top_w: torch.Tensor, top_i: torch.Tensor) -> None:
        top_w = top_w.detach().float().reshape(-1, top_i.shape[-1]).cpu()
        top_i = top_i.detach().reshape(-1, top_i.shape[-1]).cpu()
        e = self.num_experts
        c = torch.bincount(top_i.flatten(), minlength=e).double()
        w = torch.zeros(e, dtype=torch.float64).index_add_(
            0, top_i.flatten(), top_w.flatten().double()
        )
        self.tokens[layer] = self.tokens.get(layer, 0) + top_i.shape[0]
        self.counts[layer] = self.counts.get(layer, torch.zeros(e, dtype=torch.float64)) + c
        self.weights[layer] = self.weights.get(layer, torch.zeros(e, dtype=torch.float64)) + w

    def scores(self, method: str) -> dict[int, list[float]]:
        """ESFT relevance per layer: token ratio or gate score."""
        if method == "token-ratio":
            return {
                layer: token_ratio(self.counts[layer].tolist(), self.tokens[layer], self.top_k)
                for layer in self.tokens
            }
        if method == "gate-score":
            return {
                layer: gate_score(self.weights[layer].tolist(), self.tokens[layer])
                for layer in self.tokens
            }
        raise ValueError(f"unknown relevance method {method!r}: token-ratio or gate-score")


@torch.no_grad()
def collect(
    model, layout: ExpertLayout, batches, device: str = "cpu", progress: bool = False
) -> RoutingStats:
    """Run batches through the frozen model and accumulate routing statistics."""
    stats = RoutingStats(layout.num_experts, layout.top_k)
    handles = []
    for layer in layout.moe_layers:

        def hook(_mod, _inp, out, layer=layer):
            _logits, top_w, top_i = out[:3]
            stats.add(layer, top_w, top_i)

        handles.append(router(model, layout, layer).register_forward_hook(hook))
    try:
        model.eval()
        for b in tqdm(batches, desc="routing", disable=not progress, leave=False):
            model(input_ids=b.to(device))
    finally:
        for h in handles:
            h.remove()
    return stats
