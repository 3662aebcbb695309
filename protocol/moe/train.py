"""The training loop every trainer shares: AdamW, warmup + cosine schedule, clipping, progress.

What is trained is decided by the caller through the parameter list (all weights for
pre-training and full fine-tuning, LoRA adapters, or the selected experts' delta tensors).
How long, how fast and with which memory options come from the job's TrainSettings
(protocol/settings.py, the one place those are written); TrainConfig adds the loop's own knobs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from protocol.settings import TrainSettings


@dataclass(frozen=True)
class TrainConfig:
    """Inner-loop hyper-parameters around a job's TrainSettings, which give the steps, the peak
    lr, activation checkpointing and the loss chunk (defaults follow ESFT/OpenDiLoCo where they
    apply). The loop reads nothing else of the settings (batches come from the caller)."""

    settings: TrainSettings = field(default_factory=TrainSettings)
    warmup: int = 10  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # global grad-norm clip; 0 disables
    aux_loss: bool = False  # add the router load-balancing loss (pre-training only)
    bf16: bool = False  # autocast to bf16 (GPU)

    def __post_init__(self):
        if not isinstance(self.settings, TrainSettings):
            raise ValueError(f"settings must be TrainSettings, got {self.settings!r}")
        if self.warmup < 0:
            raise ValueError("warmup must be non-negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        if self.settings.loss_chunk and self.aux_loss:
            raise ValueError("loss_chunk computes the LM loss only: it cannot add the aux loss")

    @classmethod
    def for_job(cls, settings: TrainSettings, *, bf16: bool) -> TrainConfig:
        """A miner's loop for `settings`: warmup over the first tenth of the steps."""
        return cls(settings, warmup=max(1, settings.steps // 10), bf16=bf16)

    def lr_at(self, step: int) -> float:
        lr, steps = self.settings.lr, self.settings.steps
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    tokens_per_s: float  # steady-state training throughput (first step excluded)


IGNORE_INDEX = -100  # transformers' label for positions without a loss


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, computed `chunk` rows at a
    time; the gradients are computed in the same pass, so backward keeps only d(hidden)
    [rows, H] (and d(weight) when the head is trained), never the [rows, vocab] logits or
    their log-softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = labels != IGNORE_INDEX
        count = valid.sum()
        target = labels.masked_fill(~valid, 0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, y, ok = hidden[rows], target[rows], valid[rows]
            logits = torch.nn.functional.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            total += ((lse - picked) * ok).sum()
            if need_h or need_w:
                g = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                g[torch.arange(len(y), device=g.device), y] -= 1
                g.mul_((ok / count).unsqueeze(1))
                if need_h:
                    grad_h[rows] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w += (g.t().to(h.dtype) @ h).float()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad.to(grad_w.dtype),
            None,
            None,
        )


def chunked_lm_loss(model, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """The next-token loss `model(input_ids, labels=input_ids).loss` computes (mean over the
    predicted positions), with the LM head and cross-entropy fused in chunks of `chunk` tokens:
    equal up to float rounding, without the [tokens, vocab] logits in memory. Runs the decoder
    directly, so it is for a plain (or PEFT-wrapped) causal LM on one process."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError("chunked loss needs a bias-free linear LM head")
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    return _ChunkedLMHeadLoss.apply(hidden, head.weight, labels, chunk)


def lm_loss(model, input_ids: torch.Tensor, aux: bool = False, chunk: int = 0) -> torch.Tensor:
    """Next-token cross-entropy; the router aux loss only when asked (never for scoring).
    `chunk` > 0 uses `chunked_lm_loss` (no aux loss there)."""
    if chunk:
        if aux:
            raise ValueError("the chunked loss has no aux loss")
        return chunked_lm_loss(model, input_ids, chunk)
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=aux)
    return out.loss


def checkpointing_layers(model) -> list[torch.nn.Module]:
    """The decoder layers transformers' activation checkpointing acts on."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def activation_checkpointing(model, enabled: bool = True):
    """Per-layer activation checkpointing for the duration of the block (non-reentrant), left
    as it was afterwards (a model that already checkpoints is not touched).

    Non-reentrant checkpointing gives the parameters inside a layer their gradients even when
    the layer's input does not require grad, so the embedding output stays a frozen input:
    transformers' `enable` also hooks the input embeddings to require grad (a reentrant-only
    need), which would make backward run through every frozen layer below the first trained
    one. That hook is removed again here."""
    layers = checkpointing_layers(model)
    if not enabled or any(m.gradient_checkpointing for m in layers):
        yield
        return
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layers transformers can checkpoint")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    had_input_hooks = bool(getattr(lm, "_require_grads_hooks", None))
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.23
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not had_input_hooks:
        lm.disable_input_require_grads()
    try:
        yield
    finally:
        disable = getattr(lm, "activation_checkpointing_disable", None)
        (disable or lm.gradient_checkpointing_disable)()


def adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """The inner optimizer `train_loop` uses unless given one (a caller that keeps its state
    across jobs builds it here, so a fresh and a resumed run differ only in the state)."""
    s = cfg.settings
    return torch.optim.AdamW(
        params, lr=s.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True
    )


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
    """Run steps [start_step, cfg.settings.steps). `step_context` wraps each forward+backward.
    Pass `optimizer` to resume with its state. Activation checkpointing (the settings'
    gradient_checkpointing) is on for the loop only."""
    model.train()
    settings = cfg.settings
    opt = optimizer or adamw(params, cfg)
    ctx = step_context or nullcontext
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    losses, tokens, t0 = [], 0, time.perf_counter()
    t_warm, tokens_warm = t0, 0
    bar = tqdm(
        range(start_step, settings.steps), desc=desc, disable=not progress, unit="step", leave=False
    )
    with activation_checkpointing(model, settings.gradient_checkpointing):
        for step in bar:
            batch = next(batches).to(device)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            with ctx(), amp:
                loss = lm_loss(model, batch, aux=cfg.aux_loss, chunk=settings.loss_chunk)
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
    return TrainResult(settings.steps - start_step, tokens, total, losses, rate)
