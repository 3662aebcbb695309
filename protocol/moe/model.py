"""Model source: load a transformers 5 MoE causal LM and describe its fused expert layout.

Every supported family (Qwen3-MoE, Qwen3-Next, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3) stores
each MoE layer's routed experts as two fused 3-D parameters:
`mlp.experts.gate_up_proj [E, 2I, H]` (rows [0, I) gate, [I, 2I) up) and
`mlp.experts.down_proj [E, H, I]`, with the router at `mlp.gate`. Dense layers (DeepSeek-V3's
first layers, Qwen's `mlp_only_layers`) simply have no experts. Anything else is refused with a
message naming what was found.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM

if TYPE_CHECKING:
    from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3_next", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3")
_LAYER_RE = re.compile(r"^(?P<prefix>.*layers)\.(?P<layer>\d+)\.mlp\.experts$")


class UnsupportedModelError(ValueError):
    """The model has no fused-expert MoE layers this project can train."""


@dataclass(frozen=True)
class ExpertLayout:
    """Shape of a model's routed experts: what an assignment and a delta refer to."""

    prefix: str  # e.g. "model.layers" or "model.language_model.layers"
    moe_layers: tuple[int, ...]  # indices of layers that have routed experts
    num_experts: int  # E, routed experts per MoE layer
    hidden_size: int  # H
    intermediate_size: int  # I, per expert
    top_k: int  # experts per token

    def expert_key(self, layer: int, expert: int, proj: str) -> str:
        """Hub (per-expert) key name of one projection of one expert."""
        return f"{self.prefix}.{layer}.mlp.experts.{expert}.{proj}.weight"

    def proj_shape(self, proj: str) -> tuple[int, int]:
        """[out, in] shape of one expert's projection as stored under its hub key."""
        if proj in ("gate_proj", "up_proj"):
            return (self.intermediate_size, self.hidden_size)
        if proj == "down_proj":
            return (self.hidden_size, self.intermediate_size)
        raise ValueError(f"unknown expert projection {proj!r}")

    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def to_json(self) -> dict:
        return {
            "prefix": self.prefix,
            "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "top_k": self.top_k,
        }


EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def _top_k(config) -> int:
    cfg = getattr(config, "text_config", None) or config
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise UnsupportedModelError("config names no number of experts per token")


def expert_layout(model: nn.Module) -> ExpertLayout:
    """Find the fused expert tensors of a loaded model, or explain why it has none."""
    layers: dict[int, tuple[int, int, int]] = {}
    prefix = None
    for name, module in model.named_modules():
        m = _LAYER_RE.match(name)
        if not m:
            continue
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
            raise UnsupportedModelError(
                f"{name} is not a fused expert module (expected 3-D gate_up_proj and down_proj; "
                f"found {type(module).__name__}). Per-expert nn.Linear layouts come from "
                "transformers 4.x: load the model with transformers 5."
            )
        e, two_i, h = gate_up.shape
        if down.shape != (e, h, two_i // 2):
            raise UnsupportedModelError(
                f"{name}: down_proj {tuple(down.shape)} does not match gate_up_proj "
                f"{tuple(gate_up.shape)} (non-gated experts are not supported)"
            )
        prefix = m["prefix"]
        layers[int(m["layer"])] = (e, h, two_i // 2)
    if not layers:
        mt = getattr(getattr(model, "config", None), "model_type", "?")
        raise UnsupportedModelError(
            f"model type {mt!r} has no routed-expert layers (`*.layers.N.mlp.experts`); "
            f"supported MoE families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    shapes = set(layers.values())
    if len(shapes) != 1:
        raise UnsupportedModelError(f"expert shapes differ across layers: {sorted(shapes)}")
    e, h, i = shapes.pop()
    return ExpertLayout(prefix, tuple(sorted(layers)), e, h, i, _top_k(model.config))


def fused_experts(model: nn.Module, layout: ExpertLayout, layer: int):
    """The (gate_up_proj [E,2I,H], down_proj [E,H,I]) parameters of one MoE layer."""
    mod = model.get_submodule(f"{layout.prefix}.{layer}.mlp.experts")
    return mod.gate_up_proj, mod.down_proj


def router(model: nn.Module, layout: ExpertLayout, layer: int) -> nn.Module:
    """The router module of one MoE layer (its forward returns logits, weights, indices)."""
    return model.get_submodule(f"{layout.prefix}.{layer}.mlp.gate")


def expert_slices(model: nn.Module, layout: ExpertLayout, layer: int, expert: int):
    """Views {proj: tensor [out, in]} of one expert inside the fused tensors (no copy)."""
    gate_up, down = fused_experts(model, layout, layer)
    i = layout.intermediate_size
    return {
        "gate_proj": gate_up.data[expert, :i],
        "up_proj": gate_up.data[expert, i:],
        "down_proj": down.data[expert],
    }


@functools.lru_cache(maxsize=8)
def config_layout(model_dir: str) -> ExpertLayout:
    """A model directory's ExpertLayout from its config alone: the model is built on the meta
    device, so no weight is read (what a validator needs to bound a download before it has
    loaded anything). Cached per path: a base or checkpoint directory never changes."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: not a Hugging Face model directory"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return expert_layout(model)


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    source: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    experts_implementation: str | None = None,
):
    """Load a MoE causal LM from a local directory or a hub id; refuse non-MoE models clearly.

    A hub id only resolves where the hub (or its cache) is reachable; this machine uses local
    directories. `experts_implementation` picks transformers' expert kernels ("grouped_mm" is the
    fastest on CPU and GPU here; "eager" is the reference loop).
    """
    src = str(source)
    if Path(src).exists() and not (Path(src) / "config.json").exists():
        raise FileNotFoundError(f"{src} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(src)
    mt = getattr(config, "model_type", "?")
    text_mt = getattr(getattr(config, "text_config", None), "model_type", mt)
    if mt not in SUPPORTED_MODEL_TYPES and text_mt not in SUPPORTED_MODEL_TYPES:
        known_moe = any(
            hasattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
        )
        hint = "an MoE family not yet verified" if known_moe else "not a Mixture-of-Experts model"
        raise UnsupportedModelError(
            f"{src}: model type {mt!r} is {hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    kwargs = {"dtype": getattr(torch, dtype)}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    expert_layout(model)  # raises with the reason if the layout is unusable
    return model.to(device)
