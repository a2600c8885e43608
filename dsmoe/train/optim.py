"""AdamW with parameter groups, and the learning-rate schedules (warmup, then cosine or WSD).

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
Not here: per-layer learning rates, muP scaling, 8-bit optimizer states.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dsmoe.train.config import TrainConfig


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
