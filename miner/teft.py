"""Expert-only training (TEFT/ESFT) on transformers 5 fused expert tensors.

Each trained MoE layer's experts module gets a submodule `teft` with trainable deltas for only
the S selected experts of that layer (`gate_up_delta [S, 2I, H]`, `down_delta [S, H, I]`), and
while attached its forward is replaced by a split forward. The fused `gate_up_proj [E, 2I, H]`
/ `down_proj [E, H, I]` stay frozen parameters, used as they are for the routes (token, k) to
unselected experts; the routes to selected experts run on `W[ids] + delta` ([S, ...]), so no
tensor of size E is copied and weight gradients exist for the S experts only:
- grouped_mm (the default kernel): the routes are sorted with the selected experts' last, then
  one grouped GEMM per projection over the fused tensors takes the frozen rows and one over
  `W[ids] + delta` the trained rows (transformers' `_grouped_mm`, same per-row arithmetic);
- any other kernel (eager, batched_mm, ...): the configured kernel runs twice, on the fused
  tensors with the selected routes given the sentinel index E (the expert-parallel convention
  every kernel skips or zero-weights), and on `W[ids] + delta` over the selected routes only.
Consequences, by construction rather than by masking:
- frozen parameters and unselected experts are never written, so they stay bit-identical;
- AdamW state exists only for the selected experts (memory ~ S/E of the experts);
- `delta` is exactly the pseudo-gradient a miner ships.
Weight decay acts on `delta`, so it pulls trained experts toward the base checkpoint (not
toward zero): this keeps deltas small, which limits drift on general text and compression error.
Loss and gradients equal those of the former `W + index_add(delta)` parametrization (and of
full fine-tuning restricted to the selected rows) up to float summation order
(tests/unit/test_teft_forward.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    _default_apply_gate,
    _grouped_linear,
)

from protocol.moe.experts import Assignment
from protocol.moe.model import ExpertLayout, fused_experts
from protocol.moe.train import adamw, train_loop

_SUBMODULE = "teft"


class SelectedExperts(nn.Module):
    """The trainable part of one MoE layer: deltas for its S selected experts.

    `slot[e]` is the row of expert e in the deltas (-1 for an unselected expert)."""

    def __init__(
        self,
        expert_ids: list[int],
        num_experts: int,
        gate_up_shape: tuple[int, ...],
        down_shape: tuple[int, ...],
    ):
        super().__init__()
        ids = torch.tensor(expert_ids, dtype=torch.long)
        slot = torch.full((num_experts,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(expert_ids))
        self.register_buffer("expert_ids", ids, persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        s = len(expert_ids)
        self.gate_up_delta = nn.Parameter(torch.zeros(s, *gate_up_shape, dtype=torch.float32))
        self.down_delta = nn.Parameter(torch.zeros(s, *down_shape, dtype=torch.float32))


class _ExpertsView:
    """An experts module seen with some attributes replaced; the kernels only read attributes,
    so they run unchanged on other weights or with other flags, and the module is not mutated."""

    def __init__(self, module: nn.Module, **overrides):
        self.__dict__.update(overrides)
        self.__dict__["_module"] = module

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _expert_kernel(module: nn.Module):
    """The forward transformers dispatches this experts module to (its configured
    implementation; the class's own eager loop for "eager" or when none is configured)."""
    cls_forward = type(module).forward
    eager = getattr(cls_forward, "__wrapped__", None)
    if eager is None:  # a class without transformers' experts dispatch: its forward is the loop
        return cls_forward
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if impl in (None, "eager"):
        return eager
    return ALL_EXPERTS_FUNCTIONS.get_interface(impl, eager)


def _selected_weights(module: nn.Module, sel: SelectedExperts, device: torch.device):
    """`W[ids] + delta` for the S selected experts: the only expert weights that get a gradient."""
    ids = sel.expert_ids.to(device)
    w_gu = module.gate_up_proj.index_select(0, ids)
    w_dn = module.down_proj.index_select(0, ids)
    return ids, w_gu + sel.gate_up_delta.to(w_gu.dtype), w_dn + sel.down_delta.to(w_dn.dtype)


class _AddRows(torch.autograd.Function):
    """`zeros[num_rows, ...].index_add(0, index_a, a).index_add(0, index_b, b)` that saves only
    the indices for backward (torch's index_add also keeps `a` and `b` alive)."""

    @staticmethod
    def forward(ctx, num_rows: int, index_a, a, index_b, b):
        ctx.save_for_backward(index_a, index_b)
        out = a.new_zeros(num_rows, *a.shape[1:])
        return out.index_add_(0, index_a, a).index_add_(0, index_b, b)

    @staticmethod
    def backward(ctx, grad):
        index_a, index_b = ctx.saved_tensors
        return None, None, grad.index_select(0, index_a), None, grad.index_select(0, index_b)


class _SwiGLUScaled(torch.autograd.Function):
    """`silu(gate) * up * weight` for `gate_up = [gate | up]` keeping only `gate_up` and
    `weight` for backward (autograd's silu, mul, mul keep two more [rows, I] tensors)."""

    @staticmethod
    def forward(ctx, gate_up, weight):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        return torch.nn.functional.silu(gate) * up * weight

    @staticmethod
    def backward(ctx, grad):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        act = gate * sig
        grad_w = (grad * act * up).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_w
        gw = grad * weight
        grad_gate = gw * up * sig * (1 + gate * (1 - sig))
        return torch.cat([grad_gate, gw * act], dim=-1), grad_w


def _scaled_gate(module: nn.Module):
    """f(gate_up, weight) = the module's gated activation times the routing weight."""
    apply_gate = getattr(type(module)._apply_gate, "__func__", type(module)._apply_gate)
    if apply_gate is _default_apply_gate and isinstance(module.act_fn, (nn.SiLU, SiLUActivation)):
        return _SwiGLUScaled.apply
    return lambda gate_up, weight: module._apply_gate(gate_up) * weight


def _grouped_split_forward(
    module: nn.Module,
    sel: SelectedExperts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' grouped_mm experts forward with the routes sorted so that the selected
    experts' rows come last: the frozen rows run one grouped GEMM per projection over the fused
    tensors (offsets of the E experts, the selected ones empty), the trained rows one over
    `W[ids] + delta` (offsets of the S experts). One sort, no masking, no copy of size E.

    Two memory-lean changes, equal up to float rounding: the routing weight scales the
    activation before the down projection (linear, so the same result) instead of its output,
    so autograd keeps [routes, I] rather than [routes, H] for the weight's gradient; and the
    rows are added back onto their tokens with index_add (deterministic on CPU, several times
    cheaper than transformers' gather back to route order) keeping only the indices."""
    device = hidden_states.device
    num_tokens, num_top_k = top_k_index.shape
    num_experts = module.num_experts
    ids, w_gu, w_dn = _selected_weights(module, sel, device)
    slot = sel.slot.to(device)[top_k_index].reshape(-1)
    key = torch.where(slot >= 0, slot + num_experts, top_k_index.reshape(-1))
    key_g, perm = torch.sort(key)
    token_g = perm // num_top_k
    weights_g = top_k_weights.reshape(-1).index_select(0, perm).unsqueeze(-1)
    bins = num_experts + len(ids)
    # histc as in transformers (float on CPU/MPS, int elsewhere): routes per key.
    hist_in = key_g.float() if device.type in ("cpu", "mps") else key_g.int()
    offsets = torch.cumsum(
        torch.histc(hist_in, bins=bins, min=0, max=bins - 1), 0, dtype=torch.int32
    )
    n = int(offsets[num_experts - 1])  # frozen rows first, then the selected experts' rows
    t = module.is_transposed
    gate = _scaled_gate(module)

    def experts(rows: slice, gate_up, down, offs):
        # A gather per part: the trained part's input is kept for its weight gradient, and it
        # must not be a view that keeps the frozen rows alive too.
        x = hidden_states.index_select(0, token_g[rows])
        y = _grouped_linear(x, gate_up, offs, is_transposed=t)
        return _grouped_linear(gate(y, weights_g[rows].to(y.dtype)), down, offs, is_transposed=t)

    frozen = experts(slice(0, n), module.gate_up_proj, module.down_proj, offsets[:num_experts])
    trained = experts(slice(n, None), w_gu, w_dn, offsets[num_experts:] - n)
    if device.type == "cpu":
        # CPU index_add runs sequentially per index, so it is deterministic.
        out = _AddRows.apply(num_tokens, token_g[:n], frozen, token_g[n:], trained)
    else:
        # Accelerators: index_add's atomics are not deterministic; gather back to route order
        # and sum over k, as transformers does.
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=device)
        routed = torch.cat([frozen, trained]).index_select(0, inv_perm)
        out = routed.view(num_tokens, num_top_k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


def _grouped_path_applies(module: nn.Module) -> bool:
    return (
        getattr(getattr(module, "config", None), "_experts_implementation", None) == "grouped_mm"
        and getattr(module, "has_gate", False)
        and not getattr(module, "has_bias", True)
        and not getattr(module, "has_post_expert_norm", True)
        and not getattr(module, "_is_expert_parallel", True)
    )


def _split_forward(
    module: nn.Module,
    sel: SelectedExperts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward with frozen fused weights for unselected routes and `W[ids] + delta`
    for the selected ones (see the module docstring)."""
    if _grouped_path_applies(module):
        return _grouped_split_forward(module, sel, hidden_states, top_k_index, top_k_weights)
    kernel = _expert_kernel(module)
    num_experts = module.num_experts
    slot = sel.slot.to(top_k_index.device)[top_k_index]  # [T, K], -1 where frozen
    trained = slot >= 0

    # Frozen part: selected routes get the sentinel index E, which every kernel skips as an
    # expert-parallel route (eager: not in its loop; grouped_mm: beyond the last offset, masked;
    # batched_mm: clamped and zero-weighted). The fused tensors are frozen parameters, so the
    # kernel computes input gradients only.
    frozen_view = _ExpertsView(module, _is_expert_parallel=True)
    out = kernel(
        frozen_view, hidden_states, top_k_index.masked_fill(trained, num_experts), top_k_weights
    )

    # Trained part: one compact route per row, through the same kernel over S experts.
    ids, w_gu, w_dn = _selected_weights(module, sel, top_k_index.device)
    token, k = trained.nonzero(as_tuple=True)
    if token.numel() == 0:
        # No route reached a selected expert: the deltas still get a (zero) gradient, as the
        # parametrization gave them, so AdamW and FSDP treat every step alike.
        return out + (w_gu.sum() + w_dn.sum()).mul(0).to(out.dtype)
    overrides = {
        "gate_up_proj": w_gu,
        "down_proj": w_dn,
        "num_experts": len(ids),
        "_is_expert_parallel": False,
    }
    if getattr(module, "has_bias", False):
        overrides["gate_up_proj_bias"] = module.gate_up_proj_bias.index_select(0, ids)
        overrides["down_proj_bias"] = module.down_proj_bias.index_select(0, ids)
    y = kernel(
        _ExpertsView(module, **overrides),
        hidden_states[token],
        slot[token, k].unsqueeze(-1),
        top_k_weights[token, k].unsqueeze(-1),
    )
    return out.index_add(0, token, y.to(out.dtype))


@dataclass
class _Attached:
    layer: int
    module: nn.Module
    sel: SelectedExperts


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
        """Freeze the model, add the deltas and the split forward; return the trainable tensors."""
        if self._attached:
            raise RuntimeError("already attached")
        self.model.requires_grad_(False)
        for layer, experts in sorted(self.assignment.layers.items()):
            gate_up, down = fused_experts(self.model, self.layout, layer)
            module = self.model.get_submodule(f"{self.layout.prefix}.{layer}.mlp.experts")
            if hasattr(module, _SUBMODULE) or "forward" in module.__dict__:
                raise RuntimeError(f"layer {layer}'s experts already have a forward override")
            sel = SelectedExperts(
                list(experts), gate_up.shape[0], tuple(gate_up.shape[1:]), tuple(down.shape[1:])
            ).to(gate_up.device)
            module.add_module(_SUBMODULE, sel)
            module.forward = partial(_split_forward, module, sel)
            self._attached.append(_Attached(layer, module, sel))
        return self.parameters()

    def parameters(self) -> list[nn.Parameter]:
        # Read through the module attributes each time: FSDP2 swaps the registered tensors.
        return [p for a in self._attached for p in (a.sel.gate_up_delta, a.sel.down_delta)]

    def step_context(self):
        """Kept for callers of the former parametrization cache: nothing to cache any more."""
        return nullcontext()

    def delta(self) -> dict[str, torch.Tensor]:
        """Trained minus base for every assigned expert, under hub per-expert key names."""
        i = self.layout.intermediate_size
        out = {}
        for a in self._attached:
            gu = a.sel.gate_up_delta.detach().float().cpu()
            dn = a.sel.down_delta.detach().float().cpu()
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
                gu, dn = a.sel.gate_up_delta, a.sel.down_delta
                for s, e in enumerate(self.assignment.layers[a.layer]):
                    gu[s, :i] = tensors[self.layout.expert_key(a.layer, e, "gate_proj")]
                    gu[s, i:] = tensors[self.layout.expert_key(a.layer, e, "up_proj")]
                    dn[s] = tensors[self.layout.expert_key(a.layer, e, "down_proj")]

    def detach(self, keep: bool = False) -> None:
        """Remove the deltas and the split forward. keep=True folds the deltas into the weights
        (a trained model); keep=False leaves the original base tensors untouched."""
        for a in self._attached:
            if keep:
                ids = a.sel.expert_ids
                with torch.no_grad():
                    for name, d in (("gate_up_proj", a.sel.gate_up_delta), ("down_proj", a.sel.down_delta)):  # fmt: skip
                        w = getattr(a.module, name)
                        w.data = w.data.index_add(0, ids.to(w.device), d.to(w.dtype))
            a.module.__dict__.pop("forward", None)
            del a.module._modules[_SUBMODULE]
        self._attached = []
        self.model.requires_grad_(True)


def train_experts(
    model, layout, assignment, batches, cfg, *, device="cpu", progress=True, desc="teft",
    on_step=None, keeper=None,
):  # fmt: skip
    """Train an assignment's experts for cfg.settings.steps; return (delta tensors, TrainResult).
    The model is left unchanged (base weights) on return. With a `keeper`
    (miner.optimizer_state.OptimizerKeeper) the AdamW starts from the state an earlier round
    kept, when it fits, and this round's state is kept after training."""
    trainer = ExpertTrainer(model, layout, assignment)
    params = trainer.attach()
    try:
        optimizer = None
        if keeper is not None:
            optimizer = adamw(params, cfg)
            keeper.load(optimizer, params)
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
            optimizer=optimizer,
        )
        if keeper is not None:
            keeper.save(optimizer, params)
        return trainer.delta(), result
    finally:
        trainer.detach(keep=False)
