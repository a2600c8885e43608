"""One training process: `LocalTraining`, the single-process twin of `DistTraining`.

The pretraining loop (`pretrain.py`) is single-device code that asks a session for the few
things a distributed run does differently: prepare (shard) the model, cut this process's
rows out of the global batch, sum expert loads, clip by the global gradient norm, average
logged scalars, save and load checkpoints, and give back the full model for export.
`DistTraining` (`dsmoe/parallel/training.py`) answers them over torch.distributed;
`LocalTraining` answers them as one process does anyway (the batch is all local, sums and
averages are the values themselves, clipping is torch's), and writes the single-file
checkpoints of `checkpoint.py`. The loop therefore has no `if distributed` branch, and the
tests that compare one process with several run the same loop code.

Also here: what every training command sets once per process (seeds, CPU threads).
Not here: the loop, the process group (`dsmoe/parallel/launch.py`).
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dsmoe.train import checkpoint as ckpt

if TYPE_CHECKING:
    from dsmoe.parallel.training import DistTraining


class LocalTraining:
    """The session of a plain (non-torchrun) run; same methods as `DistTraining`."""

    is_main = True  # the one process writes the log and the run directory

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.model: nn.Module | None = None

    def check(self, run_record: dict[str, Any], batch_size: int) -> None:
        """Nothing to agree on: there are no other processes."""

    def prepare(self, model: nn.Module) -> nn.Module:
        self.model = model  # kept for `full_model`: the weights are this process's own
        return model

    def local(self, batch_BW: torch.Tensor) -> torch.Tensor:
        return batch_BW

    def reduce_loads(self, loads_LE: torch.Tensor) -> torch.Tensor:
        return loads_LE

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def average(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def full_model(self, checkpoint: str | Path | None) -> nn.Module | None:
        """The trained model, for the Hugging Face export (the live one: it is whole)."""
        return self.model

    def save(self, root: str | Path, step: int, model: nn.Module, optimizer, extra: dict[str, Any],
             meta: dict[str, Any] | None = None, keep_last: int = 3) -> Path:
        """A `checkpoint.py` checkpoint: model, optimizer, `extra` (data position, ...), the
        RNG states and the step: everything an exact resume needs."""
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra,
                 "rng": ckpt.rng_state(), "step": step}
        return ckpt.save_checkpoint(root, step, state, meta, keep_last)

    def load(self, path: str | Path, model: nn.Module, optimizer) -> dict[str, Any]:
        """Restore model, optimizer and RNG states; returns the rest (`step`, `extra`'s keys)."""
        state, _ = ckpt.load_checkpoint(path, map_location=self.device)
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        ckpt.set_rng_state(state.pop("rng"))
        return state

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalTraining":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def one_process_session(checkpoint: Path | None, device: str | torch.device
                        ) -> LocalTraining | DistTraining:
    """The session of a run started without torchrun: `LocalTraining`, or a one-rank
    `DistTraining` when it continues from a sharded checkpoint that several ranks wrote."""
    if checkpoint is not None:
        from dsmoe.parallel import training as parallel_training
        if parallel_training.is_distributed_checkpoint(checkpoint):
            return parallel_training.DistTraining.single(device)
    return LocalTraining(device)


# ------------------------------------------------------------- per process, once
def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators: model initialisation is a function of `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def cpu_threads(threads: int, device: torch.device):
    """torch's CPU threads for the run (0: leave as is), restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
