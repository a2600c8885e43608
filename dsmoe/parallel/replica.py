"""Data parallelism with whole replicas: `ReplicaTraining`, for models that fit one device.

`torchrun ... -m dsmoe train --replicate` gives every rank the whole model; each computes
its rows of the global batch (as `DistTraining` does), and after the backward pass the
gradients are averaged over ranks in one flat all-reduce, so every rank takes the same
optimizer step on the same weights. There is no sharding: no all-gather before each block,
no expert all-to-all, one collective a step for the gradients (plus the expert loads and
the logged scalars, a few numbers each).

Why: for a small model the collectives of FSDP and expert parallelism cost more than the
work they split (the sharded layout ran the demo model no faster on two processes than one
process with two threads). Replicas pay one all-reduce a step (about 9 ms for 2.3M
gradients over gloo); whether that beats one process with two threads depends on how well
the threads parallelise the step's many small operations (`python -m bench replicas`, the
demo preset at dim 128, 2 cores): 0.96x at vocabulary 2048 and 1.14x at 4096 against two
spinning threads (OMP_WAIT_POLICY=ACTIVE), 1.6x against two sleeping ones.

Same update as one process: rows [r·B/W, (r+1)·B/W) per rank, each rank's loss the mean
over its rows, gradients averaged, so with equal rows per rank the step is the
single-process one up to float rounding (tests/parallel/test_torchrun_train.py).
Checkpoints are the single-process ones (`dsmoe/train/checkpoint.py`), written by rank 0
while the others wait: a replica run resumes with or without torchrun, at any world size
that divides the batch.
Not here: the sharded layout (`training.py`), overlapping the all-reduce with backward.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsmoe.errors import CheckpointError
from dsmoe.parallel import checkpoint as dcp_ckpt
from dsmoe.parallel.data_parallel import DataParallelRanks
from dsmoe.parallel.launch import DistContext, init, shutdown
from dsmoe.train.session import LocalTraining


class ReplicaTraining(DataParallelRanks, LocalTraining):
    """The session of a `--replicate` run: `LocalTraining` on every rank, with this rank's
    rows of the batch (`DataParallelRanks`) and the collectives that keep the replicas
    equal."""

    def __init__(self, ctx: DistContext):
        super().__init__(ctx.device)
        self.ctx = ctx

    @classmethod
    def from_env(cls, device: str | torch.device | None, timeout_s: float | None = None) -> "ReplicaTraining":
        return cls(init(device, timeout_s))

    def prepare(self, model: nn.Module) -> nn.Module:
        """Rank 0's weights and buffers on every rank (they are built from the same seed
        anyway; this makes equality a fact, not an assumption)."""
        model = super().prepare(model.to(self.ctx.device))
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        return model

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Average the replicas' gradients (the global batch's gradient), then clip it.

        One flat buffer, one all-reduce; a parameter without a gradient on this rank counts
        as zero, so every rank sends the same layout."""
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.ctx.all_reduce_sum(flat)
        flat /= self.ctx.world_size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def full_model(self, checkpoint: str | Path | None) -> nn.Module | None:
        return self.model if self.is_main else None

    def save(self, root: str | Path, step: int, model: nn.Module, optimizer, extra: dict[str, Any],
             meta: dict[str, Any] | None = None, keep_last: int = 3) -> Path:
        """Rank 0 writes the single-process checkpoint; every rank learns whether it worked."""
        save_here = super().save

        def write() -> str | None:
            if not self.is_main:
                return None
            return str(save_here(root, step, model, optimizer, extra, meta, keep_last))
        what = f"saving the checkpoint of step {step} in {root}"
        return Path(dcp_ckpt.on_every_rank(self.ctx, what, write)[0])

    def load(self, path: str | Path, model: nn.Module, optimizer) -> dict[str, Any]:
        if dcp_ckpt.is_dcp_checkpoint(Path(path)):
            raise CheckpointError(f"{path} holds sharded weights written by a run without "
                                  "--replicate; resume it the way it was started (torchrun "
                                  "without --replicate)")
        return super().load(path, model, optimizer)

    def close(self) -> None:
        shutdown()
