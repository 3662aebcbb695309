"""The training loop every trainer shares: AdamW, warmup + cosine schedule, clipping, progress.

What is trained is decided by the caller through the parameter list (all weights for
pre-training and full fine-tuning, LoRA adapters, or the selected experts' delta tensors).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainConfig:
    """Inner-loop hyper-parameters (defaults follow ESFT/OpenDiLoCo where they apply)."""

    steps: int = 100  # H, optimizer steps
    lr: float = 1e-3  # peak learning rate
    warmup: int = 10  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # global grad-norm clip; 0 disables
    aux_loss: bool = False  # add the router load-balancing loss (pre-training only)
    bf16: bool = False  # autocast to bf16 (GPU)

    def __post_init__(self):
        if self.steps <= 0 or self.lr <= 0 or self.warmup < 0:
            raise ValueError("steps and lr must be positive, warmup non-negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    tokens_per_s: float  # steady-state training throughput (first step excluded)


def lm_loss(model, input_ids: torch.Tensor, aux: bool = False) -> torch.Tensor:
    """Next-token cross-entropy; the router aux loss only when asked (never for scoring)."""
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=aux)
    return out.loss


def train_loop(
    model,
    params: list[torch.nn.Parameter],
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    desc: str = "train",
    progress: bool = True,
    step_context: Callable[[], AbstractContextManager] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Run steps [start_step, cfg.steps). `step_context` wraps each forward+backward (e.g. a
    parametrization cache). Pass `optimizer` to resume with its state."""
    from tqdm import tqdm

    model.train()
    opt = optimizer or torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True
    )
    ctx = step_context or nullcontext
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    losses, tokens, t0 = [], 0, time.perf_counter()
    t_warm, tokens_warm = t0, 0
    bar = tqdm(
        range(start_step, cfg.steps), desc=desc, disable=not progress, unit="step", leave=False
    )
    for step in bar:
        batch = next(batches).to(device)
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        with ctx(), amp:
            loss = lm_loss(model, batch, aux=cfg.aux_loss)
            loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        tokens += batch.numel()
        if step == start_step:
            # Throughput excludes the first step (allocator and kernel warm-up).
            t_warm, tokens_warm = time.perf_counter(), tokens
        elapsed = time.perf_counter() - t_warm
        timed_tokens = tokens - tokens_warm
        rate = timed_tokens / elapsed if timed_tokens else 0.0
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    total = time.perf_counter() - t0
    rate = (
        (tokens - tokens_warm) / (time.perf_counter() - t_warm)
        if tokens > tokens_warm
        else tokens / total
    )
    return TrainResult(cfg.steps - start_step, tokens, total, losses, rate)
