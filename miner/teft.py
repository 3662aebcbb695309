"""Expert-only training (TEFT/ESFT) on transformers 5 fused expert tensors.

Each MoE layer's fused `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` get a
parametrization `W + scatter(delta)` where `delta [S, ...]` is a trainable tensor holding only
the S selected experts of that layer. Consequences, by construction rather than by masking:
- frozen parameters and unselected experts are never written, so they stay bit-identical;
- AdamW state exists only for the selected experts (memory ~ S/E of the experts);
- `delta` is exactly the pseudo-gradient a miner ships.
Weight decay acts on `delta`, so it pulls trained experts toward the base checkpoint (not
toward zero): this keeps deltas small, which limits drift on general text and compression error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from protocol.experts import Assignment
from protocol.model import ExpertLayout, fused_experts


class SelectedExpertDelta(nn.Module):
    """Parametrization W -> W + delta scattered onto the selected expert rows."""

    def __init__(self, expert_ids: list[int], slice_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer(
            "expert_ids", torch.tensor(expert_ids, dtype=torch.long), persistent=False
        )
        self.delta = nn.Parameter(torch.zeros(len(expert_ids), *slice_shape, dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        ids = self.expert_ids.to(weight.device)
        return weight.index_add(0, ids, self.delta.to(weight.dtype))


@dataclass
class _Attached:
    layer: int
    module: nn.Module
    gate_up: SelectedExpertDelta
    down: SelectedExpertDelta


class ExpertTrainer:
    """Attach trainable deltas for an assignment's experts; read them back as hub-keyed tensors."""

    def __init__(self, model: nn.Module, layout: ExpertLayout, assignment: Assignment):
        missing = set(assignment.layers) - set(layout.moe_layers)
        if missing:
            raise ValueError(f"assignment names layers without experts: {sorted(missing)}")
        if assignment.num_experts != layout.num_experts:
            raise ValueError(
                f"assignment is for {assignment.num_experts} experts per layer, model has {layout.num_experts}"
            )
        self.model, self.layout, self.assignment = model, layout, assignment
        self._attached: list[_Attached] = []

    def attach(self) -> list[nn.Parameter]:
        """Freeze the model and register the delta parametrizations; return the trainable tensors."""
        if self._attached:
            raise RuntimeError("already attached")
        self.model.requires_grad_(False)
        for layer, experts in sorted(self.assignment.layers.items()):
            gate_up, down = fused_experts(self.model, self.layout, layer)
            module = self.model.get_submodule(f"{self.layout.prefix}.{layer}.mlp.experts")
            p_gu = SelectedExpertDelta(list(experts), tuple(gate_up.shape[1:])).to(gate_up.device)
            p_dn = SelectedExpertDelta(list(experts), tuple(down.shape[1:])).to(down.device)
            parametrize.register_parametrization(module, "gate_up_proj", p_gu, unsafe=True)
            parametrize.register_parametrization(module, "down_proj", p_dn, unsafe=True)
            self._attached.append(_Attached(layer, module, p_gu, p_dn))
        return self.parameters()

    def parameters(self) -> list[nn.Parameter]:
        return [p for a in self._attached for p in (a.gate_up.delta, a.down.delta)]

    def step_context(self):
        """Compute each parametrized weight once per forward instead of once per expert access."""
        return parametrize.cached()

    def delta(self) -> dict[str, torch.Tensor]:
        """Trained minus base for every assigned expert, under hub per-expert key names."""
        i = self.layout.intermediate_size
        out = {}
        for a in self._attached:
            gu, dn = a.gate_up.delta.detach().float().cpu(), a.down.delta.detach().float().cpu()
            for s, e in enumerate(self.assignment.layers[a.layer]):
                out[self.layout.expert_key(a.layer, e, "gate_proj")] = gu[s, :i].contiguous()
                out[self.layout.expert_key(a.layer, e, "up_proj")] = gu[s, i:].contiguous()
                out[self.layout.expert_key(a.layer, e, "down_proj")] = dn[s].contiguous()
        return out

    def load_delta(self, tensors: dict[str, torch.Tensor]) -> None:
        """Resume: set the trainable deltas from hub-keyed tensors (as written by `delta()`)."""
        i = self.layout.intermediate_size
        with torch.no_grad():
            for a in self._attached:
                for s, e in enumerate(self.assignment.layers[a.layer]):
                    a.gate_up.delta[s, :i] = tensors[
                        self.layout.expert_key(a.layer, e, "gate_proj")
                    ]
                    a.gate_up.delta[s, i:] = tensors[self.layout.expert_key(a.layer, e, "up_proj")]
                    a.down.delta[s] = tensors[self.layout.expert_key(a.layer, e, "down_proj")]

    def detach(self, keep: bool = False) -> None:
        """Remove the parametrizations. keep=True folds the deltas into the weights (a trained
        model); keep=False restores the original base tensors untouched."""
        for a in self._attached:
            for name in ("gate_up_proj", "down_proj"):
                parametrize.remove_parametrizations(a.module, name, leave_parametrized=keep)
        self._attached = []
        self.model.requires_grad_(True)


def train_experts(
    model, layout, assignment, batches, cfg, *, device="cpu", progress=True, desc="teft",
    on_step=None,
):  # fmt: skip
    """Train an assignment's experts for cfg.steps; return (delta tensors, TrainResult).
    The model is left unchanged (base weights) on return."""
    from protocol.train import train_loop

    trainer = ExpertTrainer(model, layout, assignment)
    params = trainer.attach()
    try:
        result = train_loop(
            model,
            params,
            batches,
            cfg,
            device=device,
            desc=desc,
            progress=progress,
            step_context=trainer.step_context,
            on_step=on_step,
        )
        return trainer.delta(), result
    finally:
        trainer.detach(keep=False)
