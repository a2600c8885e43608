"""DeepSeekMoE: fine-grained routed experts plus shared experts (DeepSeek-V3 report §2.1.2).

Shape legend: T tokens (batch and sequence flattened), D model dim, E routed experts,
F expert hidden dim, K experts chosen per token, N = T*K token-expert pairs, G groups.

Notable:
- Gate: affinities s = sigmoid(x Wᵀ) (or softmax for V2). The per-expert `bias` (trained
  by the aux-loss-free rule in `dsmoe/train/balance.py`, not by gradients) is added for
  *selection only*; the weights given to the chosen experts are the unbiased affinities,
  normalised (norm_topk_prob) and multiplied by route_scale. Group-limited routing keeps
  the best `n_limited_groups` groups (scored by their top-2 biased affinities for V3, by
  their best one for V2) and sets every other group's experts to -inf.
- Routed experts are three stacked weights (w1/w3: E×F×D, w2: E×D×F). The fast path sorts
  token-expert pairs by expert and runs each projection as one `torch._grouped_mm`; the
  per-expert loop is kept only as the reference the tests compare against.
- The layer returns `RoutingInfo` (choices, weights, affinities, per-expert token counts)
  so training can balance, analysis can trace and nothing is stored on the module.
Not here: capacity factors or token dropping (DeepSeek-V3 drops no tokens), expert
parallelism (that is `dsmoe/dist/`, applied from outside).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.config import ModelArgs
from dsmoe.model.layers import SwiGLU

EXPERT_IMPLS = ("grouped", "loop")


@dataclass
class RoutingInfo:
    """What one MoE layer decided for a batch of T tokens."""
    ids_TK: torch.Tensor  # chosen experts
    weights_TK: torch.Tensor  # their combine weights (route_scale included)
    scores_TE: torch.Tensor  # unbiased affinities of every expert (carry gradients to the gate)
    load_E: torch.Tensor  # tokens routed to each expert (int64, no gradient)


class Gate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts = args.n_routed_experts
        self.top_k = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.n_limited_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.topk_method = args.topk_method
        self.norm_topk_prob = args.norm_topk_prob
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # fp32 buffer: saved with the model, moved by .to(device) but never by the optimizer.
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if self.score_func == "sigmoid" else logits_TE.softmax(-1)
        choice_TE = scores_TE.detach() + self.bias.float()  # selection only: no gradient
        if self.n_groups > 1:
            choice_TE = self._limit_groups(choice_TE)
        ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.route_scale
        return weights_TK, ids_TK, scores_TE

    def _limit_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        choice_TGe = choice_TE.unflatten(-1, (self.n_groups, -1))
        if self.topk_method == "noaux_tc":
            group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores_TG = choice_TGe.amax(-1)
        keep_TG = group_scores_TG.topk(self.n_limited_groups, dim=-1).indices
        dropped_TG = torch.ones_like(group_scores_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
        return choice_TGe.masked_fill(dropped_TG.unsqueeze(-1), float("-inf")).flatten(1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the CPU backward
    of `torch._grouped_mm` rejects non-contiguous gradients (e.g. expanded ones)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.contiguous()


def grouped_mm(x_ND: torch.Tensor, w_EFD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Row block e of x (rows offsets[e-1]:offsets[e]) times w[e]ᵀ, in one kernel."""
    dtype = torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type) else x_ND.dtype
    out = torch._grouped_mm(x_ND.to(dtype), w_EFD.to(dtype).transpose(-2, -1), offs=offsets_E)
    return _ContiguousGrad.apply(out)


class RoutedExperts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, F_, D = args.n_routed_experts, args.moe_inter_dim, args.dim
        self.n_experts = E
        self.w1_EFD = nn.Parameter(torch.empty(E, F_, D))  # gate_proj
        self.w3_EFD = nn.Parameter(torch.empty(E, F_, D))  # up_proj
        self.w2_EDF = nn.Parameter(torch.empty(E, D, F_))  # down_proj
        self.impl = "grouped"

    def forward(self, x_TD, ids_TK, weights_TK, load_E) -> torch.Tensor:
        if self.impl == "grouped":
            return self._forward_grouped(x_TD, ids_TK, weights_TK, load_E)
        return self._forward_loop(x_TD, ids_TK, weights_TK)

    def _forward_grouped(self, x_TD, ids_TK, weights_TK, load_E) -> torch.Tensor:
        K = ids_TK.shape[1]
        order_N = ids_TK.flatten().argsort(stable=True)  # pairs sorted by expert
        token_N = order_N // K
        offsets_E = load_E.cumsum(0).to(torch.int32)
        x_ND = x_TD[token_N]
        h_NF = F.silu(grouped_mm(x_ND, self.w1_EFD, offsets_E)) * grouped_mm(x_ND, self.w3_EFD, offsets_E)
        out_ND = grouped_mm(h_NF, self.w2_EDF, offsets_E)
        out_ND = out_ND * weights_TK.flatten()[order_N].unsqueeze(-1).to(out_ND.dtype)
        return torch.zeros_like(x_TD, dtype=out_ND.dtype).index_add_(0, token_N, out_ND).type_as(x_TD)

    def _forward_loop(self, x_TD, ids_TK, weights_TK) -> torch.Tensor:
        """Reference: one plain matmul chain per expert."""
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.n_experts):
            token, slot = (ids_TK == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            x = x_TD[token]
            h = F.silu(x @ self.w1_EFD[e].T) * (x @ self.w3_EFD[e].T)
            y_TD = y_TD.index_add(0, token, (h @ self.w2_EDF[e].T) * weights_TK[token, slot, None].to(x.dtype))
        return y_TD


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Gate(args)
        self.experts = RoutedExperts(args)
        self.shared_experts = (SwiGLU(args.dim, args.n_shared_experts * args.moe_inter_dim)
                               if args.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        x_TD = x.reshape(-1, x.shape[-1])
        weights_TK, ids_TK, scores_TE = self.gate(x_TD)
        load_E = torch.bincount(ids_TK.flatten(), minlength=self.experts.n_experts)
        y_TD = self.experts(x_TD, ids_TK, weights_TK, load_E)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x), RoutingInfo(ids_TK, weights_TK, scores_TE, load_E)
