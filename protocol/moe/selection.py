"""The effectful shell around expert selection: route domain tokens, score, threshold."""

from __future__ import annotations

from transformers import AutoTokenizer

from protocol.identity.hashing import sha256_dir
from protocol.moe.data import load_blocks
from protocol.moe.experts import Assignment, select
from protocol.moe.model import expert_layout, load_model, pick_device
from protocol.moe.routing import collect

DEFAULT_P = {"token-ratio": 0.2, "gate-score": 0.1}


def select_experts(
    model_src,
    data_spec: str,
    *,
    method: str = "token-ratio",
    p: float | None = None,
    tokens: int = 131072,
    seq_len: int = 128,
    device: str = "auto",
    progress: bool = False,
    model=None,
    tokenizer=None,
    exclude: tuple[Assignment, ...] = (),
) -> Assignment:
    """Route `tokens` training-split tokens of a domain through the frozen base and select."""
    p = DEFAULT_P[method] if p is None else p
    device = pick_device(device)
    model = model or load_model(model_src, device=device)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_src)
    layout = expert_layout(model)
    blocks = load_blocks(data_spec, "train", tokenizer, seq_len, tokens)
    stats = collect(model, layout, list(blocks.split(8)), device=device, progress=progress)
    scores = stats.scores(method)
    a = select(scores, p, method, sha256_dir(model_src), layout.num_experts, exclude=exclude)
    coverage = {
        str(layer): round(sum(scores[layer][e] for e in a.layers[layer]) / sum(scores[layer]), 4)
        for layer in a.layers
    }
    info = {
        "data": str(data_spec),
        "tokens": int(blocks.numel()),
        "coverage": coverage,
        "excluded": [x.hash() for x in exclude],
        "scores": {str(k): [round(x, 6) for x in v] for k, v in scores.items()},
    }
    return Assignment(a.layers, a.method, a.p, a.model_hash, a.num_experts, info=info)
