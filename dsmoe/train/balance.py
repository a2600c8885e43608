"""Load balancing for DeepSeekMoE (DeepSeek-V3 report §2.1.2) and how it is measured.

Three modes, chosen in one place (`Balancer(mode=...)`) so they can be compared:
- `bias` (DeepSeek-V3): auxiliary-loss-free balancing. After each optimizer step, every
  gate's selection bias moves by b_i += γ·sign(mean_load − load_i), from that step's
  per-expert token counts summed over all its micro-batches; no gradient is involved (the
  bias is a buffer, and it only affects which experts are *chosen*, never their weights).
  Plus the tiny complementary sequence-wise balance loss with weight α.
- `aux`: the classic auxiliary loss (Switch Transformer / GShard) over the whole batch,
  and no bias update: the baseline the aux-free method is compared with.
- `none`: neither.

Both losses are one formula (`balance_loss`) over different spans of tokens. Over a span
of T tokens with N_r routed experts and K_r chosen per token: f_i = N_r/(K_r·T)·(number of
tokens that chose i), s'_{i,t} = s_{i,t} / Σ_j s_{j,t} (affinities normalised over *all*
experts), P_i = mean_t s'_{i,t}, L = weight·Σ_i f_i·P_i. The sequence-wise loss takes each
sequence as a span and averages; the classic loss takes the whole micro-batch as one span.
Losses are summed over MoE layers (the MTP modules' included). f is a count (no gradient);
P carries the gradient back to the gate through `RoutingInfo.scores_TE`.

MaxVio (Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
2024): how far the busiest expert is above the mean load, as a share of the mean. Used by
training (per step) and by the report (per layer over an evaluation set).
Not here: expert capacity or token dropping (DeepSeek-V3 drops none), device-level balance.
"""
from __future__ import annotations

from typing import Callable

import torch

from dsmoe.model.moe import MoE, RoutingInfo


def max_violation(load_E: torch.Tensor) -> float:
    """(max load - mean load) / mean load of one layer's per-expert token counts; 0 when even."""
    load_E = load_E.double()
    mean = load_E.mean()
    if mean <= 0:
        return 0.0
    return float((load_E.max() - mean) / mean)


@torch.no_grad()
def update_bias(bias_E: torch.Tensor, load_E: torch.Tensor, gamma: float) -> None:
    """The sign rule, in place: under-loaded experts gain γ, over-loaded ones lose γ."""
    load = load_E.to(torch.float64)
    bias_E.add_(torch.sign(load.mean() - load).to(bias_E.dtype), alpha=gamma)


def balance_loss(info: RoutingInfo, n_spans: int) -> torch.Tensor:
    """Σ_i f_i·P_i averaged over `n_spans` equal spans of the layer's tokens (unweighted).

    n_spans = batch size: the sequence-wise loss; n_spans = 1: the classic batch-wise one.
    """
    T, E = info.scores_TE.shape
    K = info.ids_TK.shape[1]
    S = T // n_spans  # tokens per span
    ids_SK = info.ids_TK.reshape(n_spans, S * K)
    counts = torch.zeros(n_spans, E, device=ids_SK.device).scatter_add_(
        1, ids_SK, torch.ones(ids_SK.shape, device=ids_SK.device))
    f = counts * (E / (K * S))  # (n_spans, E): 1 everywhere when perfectly balanced
    scores = info.scores_TE.float()
    p = (scores / scores.sum(-1, keepdim=True)).reshape(n_spans, S, E).mean(1)  # (n_spans, E)
    return (f * p).sum(-1).mean()


class Balancer:
    """Balancing state of one training run: per-step loads, bias updates, losses, MaxVio."""

    def __init__(self, moe_layers: list[MoE], mode: str = "bias", gamma: float = 0.001,
                 alpha: float = 0.0001, aux_alpha: float = 0.01,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """reduce: applied to a step's (layers, experts) loads before they are used; data-
        parallel training sums them over ranks so that every rank sees the global batch's
        loads and applies the same bias update."""
        self.layers, self.mode, self.reduce = moe_layers, mode, reduce
        self.gamma, self.alpha, self.aux_alpha = gamma, alpha, aux_alpha
        self.loads_LE: torch.Tensor | None = None

    def loss(self, routing: list[RoutingInfo], rows: int | list[int]) -> torch.Tensor | None:
        """The balance loss of one micro-batch (None when the mode has none), and records its
        loads for the step. `routing` is main stack then MTP modules, as `moe_layers()`;
        `rows`: the sequences each layer saw (one number: the same for all)."""
        if not routing:  # a dense model: nothing to balance
            return None
        loads = torch.stack([info.load_E for info in routing])
        self.loads_LE = loads if self.loads_LE is None else self.loads_LE + loads
        rows = rows if isinstance(rows, list) else [rows] * len(routing)
        if self.mode == "bias" and self.alpha > 0:  # sequence-wise: one span per row
            weight, spans = self.alpha, rows
        elif self.mode == "aux" and self.aux_alpha > 0:
            weight, spans = self.aux_alpha, [1] * len(routing)
        else:
            return None
        return weight * sum(balance_loss(info, n) for info, n in zip(routing, spans))

    def step(self) -> list[float]:
        """After the optimizer step: apply the bias rule (mode `bias`) to this step's loads,
        summed over its micro-batches; return MaxVio per layer and start a new step."""
        loads, self.loads_LE = self.loads_LE, None
        if loads is None:
            return []
        if self.reduce is not None:
            loads = self.reduce(loads)
        if self.mode == "bias":
            for layer, load_E in zip(self.layers, loads):
                update_bias(layer.gate.bias, load_E, self.gamma)
        return [max_violation(load_E) for load_E in loads]

