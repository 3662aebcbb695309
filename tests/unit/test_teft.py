"""Expert-only training: frozen weights stay bit-identical, only assigned experts learn,
optimizer state scales with the assignment, and the model is restored afterwards."""

import torch

from miner.teft import ExpertTrainer, train_experts
from protocol.artifact.delta import apply_delta
from protocol.moe.experts import Assignment
from protocol.moe.model import expert_layout, expert_slices, load_model
from protocol.moe.train import TrainConfig
from protocol.settings import TrainSettings


def _batches(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (4, 16), generator=g)


def test_only_assigned_experts_change_and_base_is_restored(random_moe_dir, random_assignment):
    model = load_model(random_moe_dir)
    layout = expert_layout(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(TrainSettings(steps=4, lr=1e-2), warmup=1, weight_decay=0.1)
    delta, result = train_experts(model, layout, random_assignment, _batches(), cfg, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), (
        "base must be restored bit-exactly"
    )
    assert set(delta) == {
        layout.expert_key(layer, e, p)
        for layer, e in random_assignment.pairs()
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert all(float(t.abs().max()) > 0 for t in delta.values()), "every assigned expert must learn"
    assert result.tokens == 4 * 4 * 16

    # Folding the delta in changes exactly the assigned experts' slices.
    apply_delta(model, layout, delta)
    changed = set()
    for layer in layout.moe_layers:
        for e in range(layout.num_experts):
            now = expert_slices(model, layout, layer, e)
            gu = before[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
            if not torch.equal(torch.cat([now["gate_proj"], now["up_proj"]]), gu):
                changed.add((layer, e))
    assert changed == set(random_assignment.pairs())


def test_optimizer_state_is_proportional_to_assigned_experts(random_moe_dir, random_assignment):
    model = load_model(random_moe_dir)
    layout = expert_layout(model)
    trainer = ExpertTrainer(model, layout, random_assignment)
    params = trainer.attach()
    n_trainable = sum(p.numel() for p in params)
    assert n_trainable == random_assignment.num_selected() * layout.params_per_expert()
    all_experts = len(layout.moe_layers) * layout.num_experts * layout.params_per_expert()
    assert n_trainable < all_experts / 3
    trainable = {id(p) for p in params}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    per_layer = random_assignment.layers.values()
    assert [p.shape[0] for p in params[::2]] == [len(e) for e in per_layer]
    names = {n for n, _ in model.named_parameters()}
    trainer.detach()
    assert {n for n, _ in model.named_parameters()} == names - {
        n for n in names if ".teft." in n
    }, "detach removes exactly the deltas"


def test_trainer_refuses_mismatched_assignment(random_moe_dir):
    import pytest

    model = load_model(random_moe_dir)
    layout = expert_layout(model)
    wrong = Assignment({5: (0,)}, "token-ratio", 0.2, "ab" * 32, 8)
    with pytest.raises(ValueError, match="without experts"):
        ExpertTrainer(model, layout, wrong)
    wrong_e = Assignment({0: (0,)}, "token-ratio", 0.2, "ab" * 32, 16)
    with pytest.raises(ValueError, match="experts per layer"):
        ExpertTrainer(model, layout, wrong_e)


def test_resume_from_a_saved_delta(random_moe_dir, random_assignment):
    model = load_model(random_moe_dir)
    layout = expert_layout(model)
    delta, _ = train_experts(
        model,
        layout,
        random_assignment,
        _batches(),
        TrainConfig(TrainSettings(steps=2, lr=1e-2), warmup=1),
        progress=False,
    )
    trainer = ExpertTrainer(model, layout, random_assignment)
    trainer.attach()
    trainer.load_delta(delta)
    again = trainer.delta()
    trainer.detach()
    assert all(torch.equal(delta[k], again[k]) for k in delta)


def test_progress_logger_logs_about_ten_lines_with_window_means(caplog):
    import logging

    from miner.local import progress_logger

    on_step = progress_logger(25, "round 3")
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        for step in range(25):
            on_step(step, float(step))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "round 3: step 2/25, train loss 0.5000"  # mean of steps 0 and 1
    assert lines[-1] == "round 3: step 25/25, train loss 24.0000"
    assert len(lines) == 13  # every 2 steps (25 // 10), and the last one
