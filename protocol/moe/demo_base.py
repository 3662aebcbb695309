"""Build a small Qwen3-MoE base and pre-train it on real text so its router specialises.

Pre-training mixes the prose and code corpora; math is kept out so it can serve as the new
domain. The tiny preset is shaped like the real targets (fine-grained experts: 64 small experts,
top-8 per token, as Qwen3-30B-A3B has 128 experts, top-8) so ESFT selects a handful of experts
per layer rather than one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from protocol.moe.data import batch_stream, docs_for_split, load_blocks
from protocol.moe.experts import select_by_threshold
from protocol.moe.model import expert_layout
from protocol.moe.routing import collect
from protocol.moe.tokenizer import train_tokenizer
from protocol.moe.train import TrainConfig, train_loop
from protocol.settings import TrainSettings

PRETRAIN_DOMAINS = ("prose", "code")
NEW_DOMAIN = "math"


@dataclass(frozen=True)
class BasePreset:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    tokenizer_chars: int  # characters per domain used to train the tokenizer
    tokens_per_domain: int  # pre-training token budget per domain


PRESETS = {
    "test": BasePreset(512, 32, 2, 2, 1, 8, 2, 16, 64, 8, 30, 3e-3, 150_000, 60_000),
    # 300 steps (~2.5 min on 2 cores): the base every measurement in docs/network.md and the
    # devnet's defaults were tuned on (614,400 pre-training tokens). Pre-trained 5x longer, its
    # loss falls further (3.8 vs 5.2) but the build takes 11 minutes, past the main job's budget.
    "tiny": BasePreset(4096, 128, 4, 4, 2, 64, 8, 32, 128, 16, 300, 3e-3, 2_000_000, 1_600_000),
}


def make_config(p: BasePreset, eos_id: int):
    return Qwen3MoeConfig(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=2 * p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.hidden_size // p.num_heads,
        moe_intermediate_size=p.moe_intermediate,
        num_experts=p.num_experts,
        num_experts_per_tok=p.top_k,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=True,
        max_position_embeddings=max(512, p.seq_len),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _tokenizer_texts(chars: int):
    for domain in (*PRETRAIN_DOMAINS, NEW_DOMAIN):
        used = 0
        for d in docs_for_split(f"corpus:{domain}", "train"):
            yield d.text
            used += len(d.text)
            if used >= chars:
                break


def build_base(
    out: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    progress: bool = True,
    steps: int | None = None,
) -> dict:
    """Train tokenizer and model, save a HF directory to `out`, return the build report."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new --out")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(_tokenizer_texts(p.tokenizer_chars), p.vocab_size)
    blocks = torch.cat(
        [
            load_blocks(f"corpus:{d}", "train", tokenizer, p.seq_len, p.tokens_per_domain)
            for d in PRETRAIN_DOMAINS
        ]
    )
    config = make_config(p, tokenizer.eos_token_id)
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation("grouped_mm")
    settings = TrainSettings(steps=steps or p.steps, lr=p.lr)
    cfg = TrainConfig(settings, warmup=max(1, settings.steps // 20), aux_loss=True)
    result = train_loop(
        model,
        list(model.parameters()),
        batch_stream(blocks, p.batch_size, seed),
        cfg,
        desc=f"pretrain {preset}",
        progress=progress,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "preset": preset,
        "seed": seed,
        "shape": asdict(p),
        "pretrain_domains": list(PRETRAIN_DOMAINS),
        "held_out_domain": NEW_DOMAIN,
        "pretrain_tokens": result.tokens,
        "pretrain_tokens_per_s": round(result.tokens_per_s),
        "final_train_loss": sum(result.losses[-20:]) / len(result.losses[-20:]),
        "params": sum(t.numel() for t in model.parameters()),
    }
    report["routing"] = routing_concentration(model, tokenizer, p.seq_len)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "moesaic_base.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def routing_concentration(model, tokenizer, seq_len: int, tokens: int = 16_384) -> dict:
    """Per domain: experts ESFT selects per layer at p=0.2/0.5 and the share of routing that
    the domain's own top experts carry; plus how much the domains' selections overlap."""
    layout = expert_layout(model)
    selections, out = {}, {}
    for domain in (*PRETRAIN_DOMAINS, NEW_DOMAIN):
        blocks = load_blocks(f"corpus:{domain}", "val", tokenizer, seq_len, tokens)
        stats = collect(model, layout, list(blocks.split(8)))
        scores = stats.scores("token-ratio")
        sel = {layer: select_by_threshold(s, 0.2) for layer, s in scores.items()}
        selections[domain] = sel
        out[domain] = {
            "experts_p0.2": sum(len(v) for v in sel.values()) / len(sel),
            "experts_p0.5": sum(len(select_by_threshold(s, 0.5)) for s in scores.values())
            / len(scores),
            "uniform_p0.2": 0.2 * layout.num_experts,
        }
    domains = list(selections)
    overlap = {}
    for i, a in enumerate(domains):
        for b in domains[i + 1 :]:
            inter = sum(
                len(set(selections[a][lyr]) & set(selections[b][lyr])) for lyr in selections[a]
            )
            union = sum(
                len(set(selections[a][lyr]) | set(selections[b][lyr])) for lyr in selections[a]
            )
            overlap[f"{a}/{b}"] = round(inter / union, 3)
    out["jaccard_p0.2"] = overlap
    return out
