"""TEFT's split experts forward (miner/teft.py) against the math it replaces.

Reference: the model with the deltas folded into its fused tensors, differentiated with respect
to those fused tensors (full fine-tuning of the experts); the rows of the selected experts are
what the deltas must receive (a gradient mask, in effect). Equal up to float summation order,
for every experts implementation transformers dispatches to. Also: nothing of expert size E
is materialised or differentiated, frozen tensors stay bit-identical under training, AdamW
state covers the deltas only, and the checkpointing / chunked-loss options of train_loop give
the same loss and gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from miner.teft import ExpertTrainer
from protocol.moe.model import expert_layout, load_model
from protocol.moe.train import TrainConfig, activation_checkpointing, lm_loss, train_loop
from protocol.settings import TrainSettings

IMPLS = ("eager", "grouped_mm", "batched_mm")
RTOL, ATOL = 1e-5, 1e-7


def _batch(vocab=128, seed=0, shape=(4, 16)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 128, (4, 16), generator=g)


def _random_deltas(params, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _teft_loss_and_grads(model, layout, assignment, batch, **loss_kw):
    trainer = ExpertTrainer(model, layout, assignment)
    params = trainer.attach()
    _random_deltas(params)
    loss = lm_loss(model, batch, **loss_kw)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    return trainer, loss.detach(), grads


def _reference(model, layout, assignment, batch):
    """Loss and fused-tensor gradients (selected rows) of the model with the deltas folded in."""
    model.requires_grad_(False)
    fused = []
    for layer, experts in sorted(assignment.layers.items()):
        m = model.get_submodule(f"{layout.prefix}.{layer}.mlp.experts")
        m.gate_up_proj.requires_grad_(True)
        m.down_proj.requires_grad_(True)
        fused.append((m, torch.tensor(experts)))
    loss = lm_loss(model, batch)
    loss.backward()
    grads = []
    for m, ids in fused:
        grads += [m.gate_up_proj.grad[ids], m.down_proj.grad[ids]]
    return loss.detach(), grads


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_and_delta_grads_match_full_finetuning_of_the_selected_rows(
    random_moe_dir, random_assignment, impl
):
    model = load_model(random_moe_dir, experts_implementation=impl)
    layout = expert_layout(model)
    batch = _batch()
    trainer, loss, grads = _teft_loss_and_grads(model, layout, random_assignment, batch)
    trainer.detach(keep=True)  # fold W + delta: the reference model
    ref_loss, ref_grads = _reference(model, layout, random_assignment, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
    assert all(float(g.abs().max()) > 0 for g in grads)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)


def _experts(impl, seed=0, experts=8, hidden=32, inter=16):
    cfg = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=2
    )
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    m = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        m.gate_up_proj.normal_(0, 0.1)
        m.down_proj.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("routes", ["mixed", "none-selected", "all-selected"])
def test_experts_module_output_and_grads(impl, routes):
    """One experts module, every kind of routing: outputs, input/routing-weight gradients and
    delta gradients equal the folded module's; no route to a selected expert still gives the
    deltas a (zero) gradient, as the parametrization did."""
    from functools import partial

    from miner.teft import SelectedExperts, _split_forward

    selected = [1, 5, 6]
    g = torch.Generator().manual_seed(0)
    tokens = 40
    if routes == "mixed":
        index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    else:
        pool = selected if routes == "all-selected" else [0, 2, 3, 4, 7]
        index = torch.tensor([pool[i % len(pool)] for i in range(2 * tokens)]).view(tokens, 2)
        index[:, 1] = torch.tensor(pool)[(torch.arange(tokens) + 1) % len(pool)]
    hidden = torch.randn(tokens, 32, generator=g)
    weights = torch.rand(tokens, 2, generator=g)

    m = _experts(impl)
    m.requires_grad_(False)
    sel = SelectedExperts(selected, 8, (32, 32), (32, 16))
    _random_deltas([sel.gate_up_delta, sel.down_delta])
    m.add_module("teft", sel)
    m.forward = partial(_split_forward, m, sel)
    h1, w1 = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    out = m(h1, index, w1)
    go = torch.randn(out.shape, generator=g)
    out.backward(go)

    ref = _experts(impl)
    with torch.no_grad():
        ref.gate_up_proj[selected] += sel.gate_up_delta
        ref.down_proj[selected] += sel.down_delta
    h2, w2 = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
    ref_out = ref(h2, index, w2)
    ref_out.backward(go)

    torch.testing.assert_close(out, ref_out, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=RTOL, atol=1e-6)
    for d, full in ((sel.gate_up_delta, ref.gate_up_proj), (sel.down_delta, ref.down_proj)):
        assert d.grad is not None
        torch.testing.assert_close(d.grad, full.grad[selected], rtol=RTOL, atol=1e-6)
        if routes == "none-selected":
            assert not d.grad.any()


class _Shapes(TorchDispatchMode):
    """Shapes of every tensor an op creates (views of the model's parameters excluded)."""

    def __init__(self, model):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.params:
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_no_tensor_of_all_experts_is_built_in_forward_or_backward(
    random_moe_dir, random_assignment, impl
):
    model = load_model(random_moe_dir, experts_implementation=impl)
    layout = expert_layout(model)
    gate_up = model.get_submodule(f"{layout.prefix}.0.mlp.experts").gate_up_proj
    down = model.get_submodule(f"{layout.prefix}.0.mlp.experts").down_proj
    fused = {tuple(gate_up.shape), tuple(down.shape)}

    trainer = ExpertTrainer(model, layout, random_assignment)
    trainer.attach()
    with _Shapes(model) as seen:
        lm_loss(model, _batch()).backward()
    assert not fused & seen.shapes, "an [E, ...] expert tensor was materialised"
    trainer.detach()

    # The detector does see them when the fused tensors are trained (the former approach).
    model.requires_grad_(False)
    gate_up.requires_grad_(True)
    with _Shapes(model) as seen:
        lm_loss(model, _batch()).backward()
    assert fused & seen.shapes


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_training_keeps_frozen_tensors_and_unselected_experts_bit_identical(
    random_moe_dir, random_assignment, impl
):
    model = load_model(random_moe_dir, experts_implementation=impl)
    layout = expert_layout(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ExpertTrainer(model, layout, random_assignment)
    params = trainer.attach()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    cfg = TrainConfig(TrainSettings(steps=3, lr=1e-2), warmup=1)
    train_loop(model, params, _batches(), cfg, progress=False, optimizer=opt)

    # Optimizer state: two moments per delta element, nothing else.
    state_numel = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state_numel == 2 * random_assignment.num_selected() * layout.params_per_expert()
    assert set(opt.state) == {*params}

    now = model.state_dict()
    assert all(torch.equal(before[k], now[k]) for k in before), "base tensors must not change"
    delta = trainer.delta()
    assert all(float(t.abs().max()) > 0 for t in delta.values())

    trainer.detach(keep=True)
    i = layout.intermediate_size
    for layer in layout.moe_layers:
        prefix = f"{layout.prefix}.{layer}.mlp.experts"
        gu, dn = model.get_submodule(prefix).gate_up_proj, model.get_submodule(prefix).down_proj
        for e in range(layout.num_experts):
            b_gu, b_dn = before[f"{prefix}.gate_up_proj"][e], before[f"{prefix}.down_proj"][e]
            if e in random_assignment.layers.get(layer, ()):
                k = layout.expert_key
                assert torch.equal(gu[e, :i], b_gu[:i] + delta[k(layer, e, "gate_proj")])
                assert torch.equal(gu[e, i:], b_gu[i:] + delta[k(layer, e, "up_proj")])
                assert torch.equal(dn[e], b_dn + delta[k(layer, e, "down_proj")])
            else:
                assert torch.equal(gu[e], b_gu) and torch.equal(dn[e], b_dn)
    assert not any(".teft." in n for n in model.state_dict())


def _trainable(model_dir, assignment, method: str):
    """(model in train mode, what a step trains): TEFT deltas with random values, or every
    parameter (full fine-tuning)."""
    model = load_model(model_dir)
    if method == "teft":
        params = ExpertTrainer(model, expert_layout(model), assignment).attach()
        _random_deltas(params)
    else:
        params = list(model.parameters())
    model.train()
    return model, params


@pytest.mark.parametrize("method", ["teft", "full"])
def test_checkpointing_gives_the_same_loss_and_grads_and_is_undone(
    random_moe_dir, random_assignment, method
):
    model, params = _trainable(random_moe_dir, random_assignment, method)
    batch = _batch()
    runs = []
    embed_requires_grad = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: embed_requires_grad.append(out.requires_grad)
    )
    for checkpointing in (False, True):
        with activation_checkpointing(model, checkpointing):
            assert model.is_activation_checkpointing == checkpointing
            loss = lm_loss(model, batch)
            loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    hook.remove()
    assert not model.is_activation_checkpointing, "checkpointing must be off afterwards"
    assert not getattr(model, "_require_grads_hooks", None), "no input-grad hook may remain"
    # The frozen-input pitfall: the embedding output must not be made to require grad.
    assert embed_requires_grad == [method == "full"] * 2
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)
    assert all(float(g.abs().max()) > 0 for g in g1[:4])
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_train_loop_with_checkpointing_trains_the_same_and_turns_it_off(
    random_moe_dir, random_assignment
):
    from miner.teft import train_experts

    model = load_model(random_moe_dir)
    layout = expert_layout(model)
    out = {}
    for checkpointing in (False, True):
        settings = TrainSettings(steps=3, lr=1e-2, gradient_checkpointing=checkpointing)
        cfg = TrainConfig(settings, warmup=1)
        out[checkpointing] = train_experts(
            model, layout, random_assignment, _batches(), cfg, progress=False
        )
        assert not model.is_activation_checkpointing
    (d0, r0), (d1, r1) = out[False], out[True]
    assert r0.losses == pytest.approx(r1.losses, rel=1e-6)
    for k in d0:
        torch.testing.assert_close(d0[k], d1[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["teft", "full"])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_loss_equals_the_model_loss(random_moe_dir, random_assignment, method, chunk):
    model, params = _trainable(random_moe_dir, random_assignment, method)
    batch = _batch()
    runs = []
    for c in (0, chunk):
        loss = lm_loss(model, batch, chunk=c)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=0)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_chunked_loss_option_is_checked():
    with pytest.raises(ValueError, match="aux"):
        TrainConfig(TrainSettings(loss_chunk=128), aux_loss=True)
    with pytest.raises(ValueError, match="non-negative"):
        TrainConfig(TrainSettings(loss_chunk=-1))


def test_train_memory_counts_the_compact_path_and_the_options(random_moe_dir, random_assignment):
    """TEFT's memory is below full fine-tuning's; its new tensors (`W[ids] + delta`, the kept
    inputs of the selected rows) are counted; checkpointing and the chunked loss lower it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from scripts.quality_table import train_memory_mib

    batch = _batch(shape=(4, 32))
    model = load_model(random_moe_dir)
    full = train_memory_mib(model, list(model.parameters()), batch)
    trainer = ExpertTrainer(model, expert_layout(model), random_assignment)
    params = trainer.attach()
    teft = train_memory_mib(model, params, batch)
    ckpt = train_memory_mib(
        model, params, batch, cfg=TrainConfig(TrainSettings(gradient_checkpointing=True))
    )
    chunked = train_memory_mib(model, params, batch, cfg=TrainConfig(TrainSettings(loss_chunk=16)))
    assert not model.is_activation_checkpointing
    assert teft < full and ckpt < teft and chunked < teft

    storages = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    weights = sum(t.untyped_storage().nbytes() for t in storages.values())
    floor = (weights + 3 * sum(p.numel() * 4 for p in params)) / 2**20
    selected_weights = sum(p.numel() * 4 for p in params) / 2**20  # W[ids] + delta, per step
    assert teft > floor + selected_weights
