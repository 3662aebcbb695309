"""Model source: the fused-expert layout of every supported family, and clear refusals."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from protocol.moe.model import UnsupportedModelError, expert_layout, expert_slices, load_model

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
FAMILIES = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
}


def _model(model_type, **extra):
    cfg = AutoConfig.for_model(model_type, **SMALL, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_of_each_family(family):
    model = _model(family, **FAMILIES[family])
    layout = expert_layout(model)
    assert layout.num_experts == 4 and layout.top_k == 2
    # DeepSeek-V3's first layer is dense (first_k_dense_replace=1): no experts there.
    assert layout.moe_layers == ((1,) if family == "deepseek_v3" else (0, 1))
    layer = layout.moe_layers[0]
    s = expert_slices(model, layout, layer, 3)
    assert s["gate_proj"].shape == layout.proj_shape("gate_proj")
    assert s["down_proj"].shape == layout.proj_shape("down_proj")
    # Slices are views: writing one changes the fused parameter.
    s["up_proj"].fill_(7.0)
    fused = model.get_submodule(f"{layout.prefix}.{layer}.mlp.experts").gate_up_proj
    assert float(fused[3, layout.intermediate_size :].mean()) == 7.0


def test_dense_model_is_refused_with_a_reason(tmp_path):
    model = _model("qwen3", head_dim=16)
    with pytest.raises(UnsupportedModelError, match="no routed-expert layers"):
        expert_layout(model)
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="not a Mixture-of-Experts model"):
        load_model(tmp_path / "dense")


def test_missing_directory_contents(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_hub_keys_load_into_fused_tensors(random_moe_dir):
    """save_pretrained writes per-expert hub keys; from_pretrained fuses them back."""
    from safetensors import safe_open

    with safe_open(str(random_moe_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        ref = f.get_tensor("model.layers.1.mlp.experts.6.down_proj.weight")
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in keys
    model = load_model(random_moe_dir)
    layout = expert_layout(model)
    assert torch.equal(expert_slices(model, layout, 1, 6)["down_proj"], ref)
