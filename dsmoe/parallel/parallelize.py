"""Parallelise a built single-device Transformer from outside: EP for routed experts,
FSDP2 for everything else, data parallelism across all ranks.

Layout over W ranks: every rank reads its own slice of the global batch (data parallel
degree W). Routed experts are split over expert-parallel groups of `ep` consecutive
ranks (E/ep experts each; consecutive so that, on GPUs, one group can sit inside a node
and the all-to-all stays on NVLink); with ep < W each group holds a full copy of the
experts and their gradients are summed over the W/ep copies. Every other parameter
(attention, dense FFNs, gate, shared experts, embedding, head, MTP) is sharded by FSDP2
(`fully_shard`, one unit per block plus the root) over all W ranks. Buffers — the gate's
aux-free bias — are not sharded: each rank keeps the full vector and applies the same
update because the loads it sees are summed over ranks first.

Notable: the model is not told anything; `parallelize` swaps each MoE layer's
`RoutedExperts` for an `ExpertParallelExperts` and wraps modules, so the same model code
runs on one CPU or many GPUs. Configs are compared across ranks before any work.
Not here: tensor or pipeline parallelism, context parallelism, activation checkpointing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dsmoe.parallel.expert_parallel import ExpertParallelExperts
from dsmoe.parallel.launch import DistContext, agree
from dsmoe.errors import ConfigError
from dsmoe.model.transformer import Transformer


@dataclass(frozen=True)
class ParallelLayout:
    ep: int = 0  # expert-parallel degree; 0 means all ranks (one expert group)
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3)

    def resolve(self, world_size: int, n_routed_experts: int) -> "ParallelLayout":
        """The layout with `ep` made explicit, checked against the world and the model."""
        ep = self.ep or world_size
        if ep < 0 or world_size % ep:
            raise ConfigError(f"expert-parallel degree ep={self.ep} must divide the world size "
                              f"{world_size}: choose ep in {_divisors(world_size)}")
        if n_routed_experts % ep:
            raise ConfigError(f"{n_routed_experts} routed experts cannot be split over ep={ep} "
                              f"ranks: choose a world size / ep dividing {n_routed_experts} "
                              f"(one of {_divisors(n_routed_experts)}), or set --ep")
        return dataclasses.replace(self, ep=ep)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parallelize(model: Transformer, layout: ParallelLayout, ctx: DistContext) -> Transformer:
    """Shard `model` (built identically on every rank) in place and return it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # Compare first: a rank with another config must not fail alone and leave the rest waiting.
    agree(ctx, "model config", dataclasses.asdict(model.args))
    agree(ctx, "parallel layout", dataclasses.asdict(layout))
    layout = layout.resolve(ctx.world_size, model.args.n_routed_experts)
    model.to(ctx.device)
    ep, replicas = layout.ep, ctx.world_size // layout.ep
    mesh = init_device_mesh(ctx.device.type, (replicas, ep), mesh_dim_names=("replica", "ep"))
    for moe in model.moe_layers():
        moe.experts = ExpertParallelExperts(moe.experts, mesh, ctx.world_size)
    ignored = {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, reshard_after_forward=layout.reshard_after_forward, ignored_params=ignored)
    fully_shard(model, reshard_after_forward=layout.reshard_after_forward, ignored_params=ignored)
    register_fsdp_forward_method(model, "run")  # training calls run(), not forward()
    return model


def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: DistContext) -> torch.Tensor:
    """Clip by the norm of the *whole* model's gradient, as on one device.

    Every gradient is a DTensor on a mesh spanning all W ranks (FSDP's, or the experts'):
    summed over ranks, its local squares count each element once per replica (the product
    of the mesh sizes it is replicated over). Weighting by 1/replicas locally makes one
    all-reduce of one scalar give the global norm on every rank. (torch's own
    clip_grad_norm_ refuses DTensors that live on different meshes.)"""
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        g, replicas = _local_and_replicas(p.grad, ctx.world_size)
        sq += g.double().pow(2).sum() / replicas
        grads.append(g)
    total = ctx.all_reduce_sum(sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))  # the local view shares the gradient's storage
    return total.float()


def _local_and_replicas(t: torch.Tensor, world_size: int) -> tuple[torch.Tensor, int]:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, world_size  # a plain tensor is the same on every rank
    mesh = t.device_mesh
    if mesh.size() != world_size:
        raise ValueError(f"gradient on a mesh of {mesh.size()} ranks, not all {world_size}")
    replicas = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            replicas *= mesh.size(dim)
    return t.to_local(), replicas
