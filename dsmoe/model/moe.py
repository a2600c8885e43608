"""DeepSeekMoE: fine-grained routed experts plus shared experts (DeepSeek-V3 report §2.1.2).

Shape legend: T tokens (batch and sequence flattened), D model dim, E routed experts,
F expert hidden dim, K experts chosen per token, N = T*K token-expert pairs, G groups,
S expert input rows (slots: N, or E x capacity when padded), C capacity.

Notable:
- Gate: affinities s = sigmoid(x Wᵀ) (or softmax for V2). The per-expert `bias` (trained
  by the aux-loss-free rule in `dsmoe/train/balance.py`, not by gradients) is added for
  *selection only*; the weights given to the chosen experts are the unbiased affinities,
  normalised (norm_topk_prob) and multiplied by route_scale. Group-limited routing keeps
  the best `n_limited_groups` groups (scored by their top-2 biased affinities for V3, by
  their best one for V2) and sets every other group's experts to -inf.
- Routed experts are three stacked weights (w1/w3: E×F×D, w2: E×D×F). The fast path sorts
  token-expert pairs by expert and runs each projection as one grouped matmul
  (`experts_over_slots`): `torch._grouped_mm` over ragged blocks, or on a multi-threaded CPU a
  `bmm` over blocks padded to the busiest expert (`pads_experts`). Tokens move to and
  from the expert rows by gathers only, both ways (`_Dispatch`, `_Combine`): no
  scatter-add. The per-expert loop is kept only as the reference the tests compare against.
- A third implementation for few tokens at inference (`ragged`, `few_token_experts`): the
  same slots in the ragged layout, each projection one ragged grouped matmul over the
  experts' own weights, so an expert costs what its tokens cost (nothing if none chose it):
  no padding to the busiest expert.
  `resolve_expert_impl` is the one place that picks among the three; `auto` (the default)
  takes `ragged` when gradients are off and the tokens are few, `grouped` otherwise.
- A fourth for one or two tokens on a CPU (`views`, `fastpath.chosen_expert_views`): each
  chosen expert's weights used in place by `F.linear`, the routing read on the host once:
  2.8x the ragged path at batch 1, where per-call cost dominates. With the native kernels it
  is one call into them (`kernels.experts`), which `auto` takes up to
  NATIVE_EXPERTS_MAX_TOKENS tokens (short prompts, a batch's joiner, verify passes).
- The layer returns `RoutingInfo` (choices, weights, affinities, per-expert token counts)
  so training can balance, analysis can trace and nothing is stored on the module.
Not here: capacity factors or token dropping (DeepSeek-V3 drops no tokens), expert
parallelism (that is `dsmoe/parallel/`, applied from outside).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import kernels
from dsmoe.config import ModelArgs
from dsmoe.errors import DsmoeError
from dsmoe.model import fastpath
from dsmoe.model.fastpath import Derived, chosen_expert_views
from dsmoe.model.layers import SwiGLU

EXPERT_IMPLS = ("grouped", "ragged", "views", "loop")
# `auto` takes the few-token path up to this many tokens at inference: decode steps, verify
# passes, a prompt's prefill chunk. Measured on one CPU thread, `small` preset, one forward
# of T tokens: ragged 1.3x grouped at T <= 64, 1.13x at 256, even at 448.
RAGGED_MAX_TOKENS = 512
# On a CPU, `views` runs the native experts kernel (`kernels.experts`: each chosen expert
# once over its tokens, 8 rows at a time, its weights read from L2 after the first block)
# up to this many tokens when the kernel takes the weights. Measured, one thread, `small`,
# the routing of a real prompt, its 5 MoE layers: against the ragged grouped matmul (MKL,
# a fixed cost per expert weight per call) 2.1x at 16 tokens, 1.5-1.7x at 64-96, 1.3-1.45x
# at 128-160, 1.0-1.3x from 192 to 256, 0.9-1.1x at 320-448 (the joiner of a running batch,
# a short prompt, a speculative verify of 8 rows).
NATIVE_EXPERTS_MAX_TOKENS = 160


def resolve_expert_impl(impl: str, n_tokens: int, grad_enabled: bool, on_cpu: bool = False,
                        native_weights: bool = False) -> str:
    """The routed experts' implementation for one call: `auto` runs `ragged` at inference
    (no gradients) with few tokens, `views` instead on a CPU for one or two tokens (a decode
    step, a speculative verify: `dsmoe/model/fastpath.py`), or up to NATIVE_EXPERTS_MAX_TOKENS
    when the native kernels take the weights (`native_weights`), `grouped` otherwise; the
    others are taken as given."""
    if impl == "auto":
        if grad_enabled or n_tokens > RAGGED_MAX_TOKENS:
            return "grouped"
        if on_cpu and fastpath.enabled():
            most = NATIVE_EXPERTS_MAX_TOKENS if native_weights and kernels.available() else fastpath.max_rows()
            if n_tokens <= most:
                return "views"
        return "ragged"
    if impl not in EXPERT_IMPLS:
        raise DsmoeError(f"expert impl {impl!r}: choose 'auto' or one of {EXPERT_IMPLS}")
    return impl


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


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm(x_ND: torch.Tensor, w_EFD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Row block e of x (rows offsets[e-1]:offsets[e]) times w[e]ᵀ, in one kernel."""
    dtype = _matmul_dtype(x_ND)
    out = torch._grouped_mm(x_ND.to(dtype), w_EFD.to(dtype).transpose(-2, -1), offs=offsets_E)
    return _ContiguousGrad.apply(out)


# Padding pays for max load / mean load - 1 extra rows: at most this share (MaxVio 0.25).
MAX_PADDING = 1.25


def pads_experts(device: torch.device, load_E: torch.Tensor | None = None) -> bool:
    """Whether the grouped path pads every expert to the busiest one's load and runs one
    `bmm`, rather than `torch._grouped_mm` over ragged blocks.
    Multi-threaded CPU with an even load: pad. There `_grouped_mm` is a loop of small
    matmuls, each its own parallel region whose start and barrier cost more than the
    padding's extra rows (max load / mean load - 1) when OpenMP threads spin while they
    wait. With an uneven load (early training, before the balancing bias has caught up,
    MaxVio reaches 3-7) the padding multiplies the expert work, and with sleeping waits
    (`dsmoe` sets OMP_WAIT_POLICY=PASSIVE) the ragged loop is as fast as the padded bmm
    anyway: ragged. One CPU thread: no parallel regions, so the ragged loop wins. CUDA:
    ragged, whose kernel needs neither padding nor a host sync."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        return False
    if load_E is None or load_E.numel() == 0:
        return True
    return int(load_E.max()) * load_E.numel() <= MAX_PADDING * max(int(load_E.sum()), 1)


@dataclass
class ExpertSlots:
    """Where each token-expert pair sits among the experts' input rows: S slots, grouped
    by expert, each expert's pairs in token order."""
    slot_TK: torch.Tensor  # the slot of each token-expert pair
    token_S: torch.Tensor  # the token each slot reads (padding slots read token 0, unused)
    offsets_E: torch.Tensor  # end of each expert's rows (ragged layout)
    capacity: int | None  # rows per expert when padded, None when ragged

    @classmethod
    def plan(cls, ids_TK: torch.Tensor, load_E: torch.Tensor, padded: bool) -> "ExpertSlots":
        K = ids_TK.shape[1]
        ids_N = ids_TK.flatten()
        order_N = ids_N.argsort(stable=True)  # pairs sorted by expert
        rank_N = torch.arange(ids_N.numel(), device=ids_N.device)  # place in that order
        offsets_E = load_E.cumsum(0)
        capacity, n_slots, slot_sorted_N = None, ids_N.numel(), rank_N
        if padded:
            capacity = int(load_E.max()) if load_E.numel() else 0
            n_slots = load_E.numel() * capacity
            expert_N = ids_N[order_N]
            slot_sorted_N = expert_N * capacity + rank_N - (offsets_E - load_E)[expert_N]
        slot_N = torch.empty_like(order_N).index_copy_(0, order_N, slot_sorted_N)
        token_S = order_N.new_zeros(n_slots).index_copy_(0, slot_N, rank_N // K)
        return cls(slot_N.view_as(ids_TK), token_S, offsets_E.to(torch.int32), capacity)

    def matmul(self, x_SD: torch.Tensor, w_EFD: torch.Tensor) -> torch.Tensor:
        """Slot rows of expert e times w[e]ᵀ."""
        if self.capacity is None:
            return grouped_mm(x_SD, w_EFD, self.offsets_E)
        E, dtype = w_EFD.shape[0], _matmul_dtype(x_SD)
        x_ECD = x_SD.to(dtype).view(E, self.capacity, x_SD.shape[-1])
        return torch.bmm(x_ECD, w_EFD.to(dtype).transpose(-2, -1)).flatten(0, 1)

    def dispatch(self, x_TD: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (S, D): every token copied to its K slots."""
        return _Dispatch.apply(x_TD, self.token_S, self.slot_TK)

    def combine(self, out_SD: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """(S, D) -> (T, D): each token's K slots, weighted and summed."""
        return _Combine.apply(out_SD, weights_TK, self.slot_TK, self.token_S)


# Dispatch and combine move rows by gathers in both directions: `embedding_bag` gathers a
# token's K rows and (weights and) sums them in one pass, and is each one's adjoint. The
# scatter-add autograd would otherwise use is serial and slow on CPU.
class _Dispatch(torch.autograd.Function):
    """x_SD = x_TD[token_S]; backward sums each token's K slot gradients."""

    @staticmethod
    def forward(ctx, x_TD, token_S, slot_TK):  # noqa: D102
        ctx.save_for_backward(slot_TK)
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, grad_SD):  # noqa: D102
        slot_TK, = ctx.saved_tensors
        return F.embedding_bag(slot_TK, grad_SD.contiguous(), mode="sum"), None, None


class _Combine(torch.autograd.Function):
    """y_TD = sum_k weights_TK[t, k] * out_SD[slot_TK[t, k]]. Padding slots are read by no
    token, so their gradient is 0 (their weight in the backward is 0)."""

    @staticmethod
    def forward(ctx, out_SD, weights_TK, slot_TK, token_S):  # noqa: D102
        ctx.save_for_backward(out_SD, weights_TK, slot_TK, token_S)
        return F.embedding_bag(slot_TK, out_SD, mode="sum", per_sample_weights=weights_TK.to(out_SD.dtype))

    @staticmethod
    def backward(ctx, grad_TD):  # noqa: D102
        out_SD, weights_TK, slot_TK, token_S = ctx.saved_tensors
        slot_N, S = slot_TK.flatten(), out_SD.shape[0]
        grad_SD = grad_TD.contiguous().index_select(0, token_S)  # each slot's token's gradient
        grad_weights_TK = None
        if ctx.needs_input_grad[1]:
            grad_weights_S = (grad_SD * out_SD).sum(-1)
            grad_weights_TK = grad_weights_S.index_select(0, slot_N).view_as(weights_TK).to(weights_TK.dtype)
        weights_S = grad_SD.new_zeros(S).index_copy_(0, slot_N, weights_TK.flatten().to(grad_SD.dtype))
        return grad_SD.mul_(weights_S.unsqueeze(-1)), grad_weights_TK, None, None


class RoutedExperts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, F_, D = args.n_routed_experts, args.moe_inter_dim, args.dim
        self.n_experts = E
        self.w1_EFD = nn.Parameter(torch.empty(E, F_, D))  # gate_proj
        self.w3_EFD = nn.Parameter(torch.empty(E, F_, D))  # up_proj
        self.w2_EDF = nn.Parameter(torch.empty(E, D, F_))  # down_proj
        self.impl = "auto"  # see resolve_expert_impl; Transformer.set_expert_impl sets every layer's
        self._derived = Derived()  # per-expert weight views for the `views` path (fastpath.py)

    def forward(self, x_TD, ids_TK, weights_TK, load_E) -> torch.Tensor:
        T, on_cpu = x_TD.shape[0], x_TD.device.type == "cpu"
        native = (on_cpu and not torch.compiler.is_compiling()  # traced: no guard on the row count
                  and fastpath.max_rows() < T <= NATIVE_EXPERTS_MAX_TOKENS
                  and kernels.supports(x_TD, self.w1_EFD, self.w3_EFD, self.w2_EDF))
        impl = resolve_expert_impl(self.impl, T, torch.is_grad_enabled(), on_cpu, native)
        if impl == "views":
            views = _chosen_expert_views_eager if torch.compiler.is_compiling() else chosen_expert_views
            return views(x_TD, ids_TK, weights_TK, self.w1_EFD, self.w3_EFD, self.w2_EDF, self._derived)
        if impl == "grouped":
            return self._forward_grouped(x_TD, ids_TK, weights_TK, load_E)
        if impl == "ragged":
            experts = few_token_experts if x_TD.is_cuda else _few_token_experts_eager
            return experts(x_TD, ids_TK, weights_TK, load_E, self.w1_EFD, self.w3_EFD, self.w2_EDF)
        return self._forward_loop(x_TD, ids_TK, weights_TK)

    def native_weights(self):
        """(w1, w3, w2), scales) for the native kernels (`dsmoe/kernels`), scales None for
        fp32; None when the weights are not what they take."""
        ws = (self.w1_EFD, self.w3_EFD, self.w2_EDF)
        return (ws, None) if all(w.dtype == torch.float32 and w.is_contiguous() for w in ws) else None

    def _forward_grouped(self, x_TD, ids_TK, weights_TK, load_E) -> torch.Tensor:
        slots = ExpertSlots.plan(ids_TK, load_E, padded=pads_experts(x_TD.device, load_E))
        return experts_over_slots(slots, x_TD, weights_TK, self.w1_EFD, self.w3_EFD, self.w2_EDF)

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


def experts_over_slots(slots: ExpertSlots, x_TD, weights_TK, w1_EFD, w3_EFD, w2_EDF) -> torch.Tensor:
    """The routed experts over planned slots, each projection one grouped matmul with the
    weights used in place. w1 and w3 stay two matmuls rather than one over their
    concatenation: the concatenation copies every expert's weights each call (and its
    backward splits the gradient again), and the halves of its output are strided. Measured,
    `demo` dims, 1024 tokens, forward + backward: 8.2 ms against 8.9 on one CPU thread
    (ragged), 5.5 against 5.6 on two (padded); the same values."""
    x_SD = slots.dispatch(x_TD)
    h_SF = F.silu(slots.matmul(x_SD, w1_EFD)) * slots.matmul(x_SD, w3_EFD)
    return slots.combine(slots.matmul(h_SF, w2_EDF), weights_TK).type_as(x_TD)


def few_token_experts(x_TD, ids_TK, weights_TK, load_E, w1_EFD, w3_EFD, w2_EDF) -> torch.Tensor:
    """The ragged layout of the grouped path: an expert costs what its tokens cost."""
    return experts_over_slots(ExpertSlots.plan(ids_TK, load_E, padded=False), x_TD, weights_TK,
                              w1_EFD, w3_EFD, w2_EDF)


# torch.compile cannot trace the CPU grouped matmul in fp32 (its meta function wants bf16):
# on a CPU the few-token path stays eager inside a compiled step.
_few_token_experts_eager = torch.compiler.disable(few_token_experts)
# The chosen-expert views read the routing on the host: a graph break anyway, made explicit.
_chosen_expert_views_eager = torch.compiler.disable(chosen_expert_views)


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
