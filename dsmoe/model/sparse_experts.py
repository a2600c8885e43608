"""Routed experts computed one chosen expert at a time, from weights handed over per expert.

What for: experts whose weights are not one resident (E, F, D) tensor of the model's dtype:
int8 experts (`quant.Int8Experts`) and experts kept in the checkpoint files with an LRU of
hot ones (`dsmoe/infer/expert_store.py`). A subclass says how to get expert e's three
weights (`expert(e)`); each is a tensor (used by `F.linear`) or any object with a
`linear(x)` method (an int8 weight).

Notable: up to NATIVE_EXPERTS_MAX_TOKENS tokens on a CPU go through the native experts kernel
(`kernels.experts_by_id`: the chosen experts' weights by pointer, the same C loop as the
resident model's few-token path, so the same bits), when the call's chosen experts may be
held at once (`held_at_once`: a store's budget; beyond it the path below keeps one expert
at a time, and agrees with the kernel to float rounding, not bit for bit). More tokens take the ragged layout of
`moe.ExpertSlots` (same dispatch, same combine), each expert's rows through the same
matmuls as the ragged grouped matmul computes for that block, so with fp32 weights the
output is bit-identical to the resident model's `ragged` path (what `auto` runs at
inference from there up to RAGGED_MAX_TOKENS tokens per forward); tests/infer/test_expert_store.py
pins both. Only the experts some token
chose are asked for, one at a time, so the weights held at once are one expert's; each is
asked for twice (w1 and w3, then w2 after the SiLU over all rows).
Not here: gradients (inference only), the padded or fused-w1|w3 layouts of training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import kernels
from dsmoe.model import fastpath
from dsmoe.model.moe import NATIVE_EXPERTS_MAX_TOKENS, ExpertSlots


def apply_weight(w, x: torch.Tensor) -> torch.Tensor:
    """x wᵀ for a plain weight tensor, or the weight's own `linear` (int8)."""
    return F.linear(x, w.to(x.dtype)) if isinstance(w, torch.Tensor) else w.linear(x)


class SparseExperts(nn.Module):
    """Base of routed experts served one expert at a time; `forward` matches RoutedExperts'."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.impl = "auto"  # set by Transformer.set_expert_impl; there is one implementation here

    def expert(self, e: int) -> tuple:
        """(w1 (F, D), w3 (F, D), w2 (D, F)) of expert e."""
        raise NotImplementedError

    def held_at_once(self) -> int:
        """How many experts one call may hold at once (the native kernel holds every expert
        the call chose until it returns): all of them here; a store, those its budget holds."""
        return self.n_experts

    def forward(self, x_TD, ids_TK, weights_TK, load_E) -> torch.Tensor:
        # As `RoutedExperts` under `auto`: the native kernel for up to NATIVE_EXPERTS_MAX_TOKENS,
        # when the experts this call chose may be held at once (else one at a time, below).
        if (self.impl == "auto" and fastpath.fast_rows(x_TD, 1) and kernels.supports(x_TD)
                and x_TD.shape[0] <= max(fastpath.max_rows(), NATIVE_EXPERTS_MAX_TOKENS)
                and int((load_E > 0).sum()) <= self.held_at_once()):
            y = kernels.experts_by_id(x_TD, ids_TK, weights_TK, self.n_experts, self.expert)
            if y is not None:
                return y
        return _per_expert(x_TD, ids_TK, weights_TK, load_E, self.expert)


@torch.compiler.disable  # a Python loop over the chosen experts, fetched on demand
def _per_expert(x_TD, ids_TK, weights_TK, load_E, expert) -> torch.Tensor:
    slots = ExpertSlots.plan(ids_TK, load_E, padded=False)
    x_SD = slots.dispatch(x_TD)
    ends = slots.offsets_E.tolist()
    chosen = [(e, slice(ends[e] - int(load_E[e]), ends[e])) for e in load_E.nonzero().flatten().tolist()]
    gate_SF = up_SF = None
    for e, rows in chosen:
        w1, w3, _ = expert(e)
        gate, up = apply_weight(w1, x_SD[rows]), apply_weight(w3, x_SD[rows])
        if gate_SF is None:
            gate_SF, up_SF = x_SD.new_empty(x_SD.shape[0], gate.shape[-1]), x_SD.new_empty(x_SD.shape[0], up.shape[-1])
        gate_SF[rows], up_SF[rows] = gate, up
    if gate_SF is None:  # no token (an empty batch)
        return torch.zeros_like(x_TD)
    # SiLU over all rows at once, as the ragged path does: a vectorised kernel's tail
    # elements may round differently, so per-expert slices would not be bit-identical.
    h_SF = F.silu(gate_SF) * up_SF
    out_SD = torch.empty_like(x_SD)
    for e, rows in chosen:  # the experts again: LRU hits whenever this call's experts fit
        out_SD[rows] = apply_weight(expert(e)[2], h_SF[rows])
    return slots.combine(out_SD, weights_TK).type_as(x_TD)
