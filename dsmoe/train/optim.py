"""AdamW with parameter groups, the learning-rate schedules (warmup, then cosine or WSD),
and the end of every optimizer step.

Parameter groups (decided here, once): weight decay applies to every matrix the model
multiplies by — attention and dense projections, the stacked routed-expert weights, the
gate's weight, MTP's `eh_proj` and the output head. It does not apply to RMSNorm gains
(1-D: decaying them pulls activations towards zero for no benefit) or to the token
embedding (a lookup table: rows of rare tokens are seldom updated, so decay would shrink
them towards zero between updates, as OLMo and others note). The gate's selection bias is a
buffer, not a parameter: the optimizer never sees it (`balance.py` moves it).

Schedules are pure functions of the step (`lr_at`), so the schedule's state is the step
counter alone and resuming needs nothing else: linear warmup from lr/warmup to lr, then
- `cosine`: down to lr·min_lr_ratio at the last step;
- `wsd` (warmup-stable-decay, MiniCPM; DeepSeek-V3 §4.2 uses a constant phase then decay):
  constant lr until the last `decay_fraction` of the steps, then linear down to
  lr·min_lr_ratio — a run can be extended by resuming a checkpoint from the stable phase;
- `constant`: lr after warmup.
AdamW uses PyTorch's fused kernel where the device has one (CPU and CUDA in torch >= 2.4):
one pass over all parameters instead of one kernel per tensor.
Every loop (pretraining, fine-tuning, GRPO) ends a step with `finish_step`: clip by the
global gradient norm, refuse a NaN/Inf norm before any weight moves, step, clear. A
non-finite loss is refused the same way (`check_finite`), before its backward pass; each
loop says in its `diverged` function what was kept and what to change.
Not here: per-layer learning rates, muP scaling, 8-bit optimizer states.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from dsmoe.errors import DsmoeError
from dsmoe.train.config import TrainConfig


class TrainingDiverged(DsmoeError):
    """The loss or the gradient became NaN or infinite."""


#: (what, value) -> the error a loop raises for a non-finite loss or gradient norm.
Diverged = Callable[[str, float], TrainingDiverged]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices with weight decay; norms and the embedding without."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg),
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) of a `cfg.steps`-step run."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
        return peak + (floor - peak) * progress
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(what: str, value: float, diverged: Diverged) -> float:
    """`value`, or the loop's `diverged(what, value)` raised when it is NaN or infinite."""
    if not math.isfinite(value):
        raise diverged(what, value)
    return value


def finish_step(optimizer: torch.optim.Optimizer, parameters, clip: float, diverged: Diverged,
                clip_grad_norm_: Callable = torch.nn.utils.clip_grad_norm_) -> float:
    """The end of an optimizer step, after the backward passes: clip the gradients to global
    norm `clip` (<= 0: measure only), refuse a non-finite norm before any weight moves, step
    and clear the gradients. Returns the norm before clipping. `clip_grad_norm_(parameters,
    max_norm)` clips: torch's over parameters, or a training session's over its model."""
    max_norm = clip if clip > 0 else float("inf")
    grad_norm = check_finite("gradient norm", float(clip_grad_norm_(parameters, max_norm)), diverged)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
