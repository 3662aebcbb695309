"""Shared fixtures: a small random Qwen3-MoE model directory and an assignment over it.

The random model is for mechanics (shapes, keys, bit-exactness); tests that need a model that
learned something build the `test` preset base with `moesaic base build`.
"""

from __future__ import annotations

import pytest


def make_random_moe(path, *, layers=2, experts=8, top_k=2, hidden=32, inter=16, vocab=128, seed=0):
    """Write a random Qwen3-MoE HF directory to `path` and return its layout dims."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    model = Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def random_moe_dir(tmp_path_factory):
    """A random 2-layer, 8-expert, top-2 Qwen3-MoE directory (shared, treat as read-only)."""
    return make_random_moe(tmp_path_factory.mktemp("random_moe") / "model")


@pytest.fixture(scope="session")
def random_assignment(random_moe_dir):
    """Layer 0 -> experts (1, 5); layer 1 -> (0, 2, 7), bound to the random model's hash."""
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment

    return Assignment(
        layers={0: (1, 5), 1: (0, 2, 7)},
        method="token-ratio",
        p=0.2,
        model_hash=sha256_dir(random_moe_dir),
        num_experts=8,
    )
