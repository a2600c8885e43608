"""What every multi-rank training session does with its ranks: `DataParallelRanks`.

Both distributed sessions (the sharded `DistTraining`, `training.py`, and the whole-replica
`ReplicaTraining`, `replica.py`) split the global batch by rows over the ranks, sum the
expert loads and average the logged scalars the same way; they differ in how the model is
held and how gradients meet. A session sets `self.ctx` (its `DistContext`).
"""
from __future__ import annotations

from typing import Any

import torch

from dsmoe.errors import ConfigError
from dsmoe.parallel.launch import DistContext, agree


class DataParallelRanks:
    ctx: DistContext

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def check(self, run_record: dict[str, Any], batch_size: int) -> None:
        """Before any work: the batch splits evenly and every rank runs the same thing."""
        if batch_size % self.ctx.world_size:
            raise ConfigError(f"TrainConfig.batch_size={batch_size} is the global batch and must "
                              f"be divisible by the {self.ctx.world_size} ranks; choose a multiple "
                              f"of {self.ctx.world_size}")
        agree(self.ctx, "run config (model, training settings, data)", run_record)

    def local(self, batch_BW: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch."""
        n = batch_BW.shape[0] // self.ctx.world_size
        return batch_BW[self.ctx.rank * n:(self.ctx.rank + 1) * n]

    def reduce_loads(self, loads_LE: torch.Tensor) -> torch.Tensor:
        """Per-expert token counts summed over ranks: the bias update sees the global batch."""
        return self.ctx.all_reduce_sum(loads_LE.clone())

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank scalars (losses of its rows) averaged over ranks, in one all-reduce."""
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.ctx.device)
        self.ctx.all_reduce_sum(t)
        return dict(zip(values, (t / self.ctx.world_size).tolist()))
