"""Load-balance measures and rules for DeepSeekMoE (DeepSeek-V3 report §2.1.2).

MaxVio (Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
2024): how far the busiest expert is above the mean load, as a share of the mean. Used by
training (per batch) and by the report (per layer over an evaluation set), so it lives here
once.
"""
from __future__ import annotations

import torch


def max_violation(load_E: torch.Tensor) -> float:
    """(max load - mean load) / mean load of one layer's per-expert token counts; 0 when even."""
    load_E = load_E.double()
    mean = load_E.mean()
    if mean <= 0:
        return 0.0
    return float((load_E.max() - mean) / mean)
