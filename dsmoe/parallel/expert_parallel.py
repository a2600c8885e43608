"""Expert parallelism: each rank keeps E/ep routed experts; tokens travel to them and back.

Shape legend (as in `dsmoe/model/moe.py`): T local tokens, D model dim, E routed experts,
El = E/ep experts held here, K experts per token, N = T*K local token-expert pairs,
M pairs received from all ranks of the expert-parallel group, P ranks in that group.

Notable:
- `ExpertParallelExperts` *is* a `RoutedExperts` (same attribute name in the model, same
  parameter names, so state-dict keys do not change). Its weights are DTensors of the
  global (E, F, D) shape sharded along the experts, so optimizers, `torch.distributed.
  checkpoint` and state dicts treat them like FSDP's; the forward runs the single-device
  `RoutedExperts` code on the local (E/ep, F, D) slice. The gate, its bias and the shared
  experts stay replicated: every rank routes its own tokens over all E experts.
- Dispatch (GShard/DeepSpeed-MoE style, no capacity, no dropped tokens as DeepSeek-V3):
  pairs are sorted by expert, which also groups them by destination rank; one small
  all-to-all exchanges the per-expert counts, then one `all_to_all_single` with variable
  splits moves the rows. The receiver runs the unchanged single-device expert code
  (grouped matmul or the loop reference) on what it got, one pair per row, and a second
  all-to-all brings results back to their tokens, where they are weighted and summed.
- Autograd flows through both all-to-alls (`_AllToAll`: backward is the reverse exchange),
  so gate weights and activations get their gradients on the rank that owns the token.
- Gradient scale: every rank's loss is the mean over its own tokens, and data-parallel
  gradients are averaged over all W ranks (FSDP does it for the other parameters). An
  expert's raw gradient here is the sum of the gradients of the losses of every rank that
  sent it tokens, so a hook divides it by W, and — when experts are replicated over
  several expert-parallel groups (ep < W) — sums it over those replicas first.
Not here: token dropping, overlapping communication with compute, hierarchical
(node-limited) dispatch of DeepSeek-V3 §3.2.2; routing decisions are the model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# ExpertSlots is the single-device dispatch/combine (gathers only): reused, not rewritten.
from dsmoe.model.moe import RoutedExperts, ExpertSlots


WEIGHTS = ("w1_EFD", "w3_EFD", "w2_EDF")


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with variable splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):  # noqa: D102
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


@dataclass
class _Plan:
    """Where this rank's pairs went and what it received, for the way back."""
    slots: ExpertSlots  # this rank's pairs in expert order (the single-device ragged layout)
    counts_PEl: torch.Tensor  # pairs received from rank p for local expert e
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank


class ExpertParallelExperts(RoutedExperts):
    """The slice [rank*El, (rank+1)*El) of a model's routed experts, plus the exchange."""

    def __init__(self, experts: RoutedExperts, mesh, world_size: int):
        """`mesh`: a 2-D DeviceMesh ("replica", "ep"); experts are split along "ep" and
        repeated along "replica". `experts` is consumed: its weights move to the meta device
        and it stays only as the code that runs on the local slice."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        nn.Module.__init__(self)
        self.mesh = mesh
        self.group = mesh.get_group("ep")
        self.ep_size = mesh.size(1)
        self.ep_rank = mesh.get_local_rank("ep")
        self.n_experts = experts.n_experts  # the router still picks among all E
        self.n_local = experts.n_experts // self.ep_size
        self.impl = experts.impl
        lo = self.ep_rank * self.n_local
        # Global DTensors (Shard(0) over "ep"): the optimizer, the checkpoint and the state
        # dict see (E, F, D) weights, as on one device; the forward uses the local slice.
        for name in WEIGHTS:
            full = getattr(experts, name)
            local = full.detach()[lo:lo + self.n_local].clone()
            setattr(self, name, nn.Parameter(
                DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False),
                requires_grad=full.requires_grad))
        experts.to("meta").n_experts = self.n_local
        self.__dict__["_local_code"] = experts  # not a submodule: no parameters of its own
        self._replica_group = mesh.get_group("replica") if mesh.size(0) > 1 else None
        self._grad_scale = 1.0 / world_size
        for p in self.parameters():
            p.register_hook(self._reduce_grad)

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.n_local

    def _reduce_grad(self, grad):
        # Runs before accumulation into .grad, so gradient accumulation stays correct.
        from torch.distributed.tensor import DTensor

        local = grad.to_local() * self._grad_scale
        if self._replica_group is not None:
            dist.all_reduce(local, group=self._replica_group)
        return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False,
                                  shape=grad.shape, stride=grad.stride())

    def forward(self, x_TD, ids_TK, weights_TK, load_E) -> torch.Tensor:
        x_MD, plan = self.dispatch(x_TD, ids_TK, load_E)
        return self.combine(self.compute(x_MD, plan), weights_TK, plan, x_TD)

    def dispatch(self, x_TD, ids_TK, load_E) -> tuple[torch.Tensor, "_Plan"]:
        """Send every token-expert pair's row to the rank owning the expert."""
        P, El = self.ep_size, self.n_local
        # The single-device layout: pairs in expert order, hence grouped by owner rank.
        slots = ExpertSlots.plan(ids_TK, load_E, padded=False)
        # counts_PEl[p, e]: pairs that rank p sends to my expert e
        counts_PEl = _exchange(load_E.to(torch.int64), [El] * P, [El] * P, self.group).view(P, El)
        plan = _Plan(slots, counts_PEl, send=load_E.view(P, El).sum(1).tolist(),
                     recv=counts_PEl.sum(1).tolist())
        return _AllToAll.apply(slots.dispatch(x_TD), plan.recv, plan.send, self.group), plan

    def compute(self, x_MD, plan: "_Plan") -> torch.Tensor:
        """The unchanged single-device expert code on the received rows, one pair per row."""
        P, El = self.ep_size, self.n_local
        local_ids_M = torch.arange(El, device=x_MD.device).repeat(P).repeat_interleave(plan.counts_PEl.flatten())
        ones_M1 = torch.ones(x_MD.shape[0], 1, device=x_MD.device, dtype=torch.float32)
        code = self._local_code
        code.impl = self.impl  # set_expert_impl() reaches this module, not the template
        weights = {name: getattr(self, name).to_local() for name in WEIGHTS}
        return torch.func.functional_call(code, weights, (x_MD, local_ids_M[:, None], ones_M1,
                                                          plan.counts_PEl.sum(0)))

    def combine(self, y_MD, weights_TK, plan: "_Plan", x_TD) -> torch.Tensor:
        """Bring results back to their tokens; weight and sum the K of each token exactly
        as the single-device code does."""
        y_ND = _AllToAll.apply(y_MD, plan.send, plan.recv, self.group)
        return plan.slots.combine(y_ND, weights_TK).type_as(x_TD)

    def extra_repr(self) -> str:
        return f"experts {self.first_expert}..{self.first_expert + self.n_local - 1} of {self.n_experts}"
