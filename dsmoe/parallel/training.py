"""What the training loop asks of the process group, in one object: `DistTraining`.

`dsmoe train` started by torchrun gets one (`DistTraining.from_env`); a plain run gets
None and never touches torch.distributed: the loop then uses `LocalTraining`, the twin
with the same methods (`dsmoe/train/session.py`). The loop asks it to shard the model, cut
its rows out of the global batch, sum the expert loads, clip by the global gradient norm,
average logged scalars, and save or load sharded checkpoints.

Notable:
- Same global batch as one process: every rank draws the *same* global batch from the
  stream (a pure function of seed and step) and keeps rows [r·B/W, (r+1)·B/W). Each
  rank's loss is the mean over its rows and gradients are averaged over ranks, so with
  equal rows per rank the update is the single-process one (the tests check 1e-5).
  Reading B rows to keep B/W costs nothing next to a training step.
- Checkpoints keep the training layout of `dsmoe/train/checkpoint.py`
  (`checkpoints/step-000100/` with `meta.json`, the last `keep_last` kept), but the folder
  holds DCP shards (`dsmoe/parallel/checkpoint.py`, with the sha256 of every file) instead
  of `state.pt`. The folder is assembled under a hidden temporary name and swapped into
  place by rank 0 once every rank has finished and `meta.json` is written (fsynced), with
  the same helper as single-process checkpoints (`dsmoe/atomic.py`): a step saved again
  replaces the old folder only when the new one is complete. A rank that fails at any
  point makes every rank raise the same CheckpointError within seconds. `extra` carries
  the step and the data position (identical on every rank); the RNG states are not saved
  (training draws no random numbers after initialisation).
- Differences between ranks in the model or training config are refused before work.
Not here: the loop itself (`dsmoe/train/pretrain.py`).
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsmoe.atomic import make_temp_dir, remove_leftovers, swap_into_place, write_synced
from dsmoe.parallel import checkpoint as dcp_ckpt
from dsmoe.parallel.data_parallel import DataParallelRanks
from dsmoe.parallel.launch import DistContext, in_torchrun, init, init_single, shutdown
from dsmoe.parallel.parallelize import ParallelLayout, clip_grad_norm_, parallelize
from dsmoe.errors import CheckpointError, ConfigError

DCP_LAYOUT = "dcp"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The parallel layout: the only thing a distributed run adds to a config."""
    group = parser.add_argument_group("distributed (under torchrun)")
    group.add_argument("--ep", type=int, default=0,
                       help="expert-parallel degree (divides the world size and the number of "
                            "routed experts); default: all ranks")
    group.add_argument("--replicate", action="store_true",
                       help="whole-model replicas, gradients averaged in one all-reduce a step: "
                            "faster than sharding for a model that fits one device (on a CPU, "
                            "run one thread per process: OMP_NUM_THREADS=1)")
    group.add_argument("--dist-timeout", type=float, default=None,
                       help="seconds a collective may wait for a silent rank before failing "
                            "(default 600, or DSMOE_DIST_TIMEOUT)")


def session_from_env(device: str | torch.device | None, ep: int = 0, replicate: bool = False,
                     timeout_s: float | None = None):
    """The session of a torchrun run: `ReplicaTraining` with `replicate`, else the sharded
    `DistTraining`; None without torchrun (nothing is initialised)."""
    if replicate and ep:
        raise ConfigError(f"--replicate keeps every expert on every rank; drop --ep {ep} "
                          "(expert parallelism is the sharded layout's)")
    if replicate and not in_torchrun():
        raise ConfigError("--replicate needs a distributed run: start with "
                          "`torchrun --nproc-per-node N -m dsmoe train --replicate ...`")
    if replicate:
        from dsmoe.parallel.replica import ReplicaTraining
        return ReplicaTraining.from_env(device, timeout_s)
    return DistTraining.from_env(device, ep, timeout_s)


@dataclass
class DistTraining(DataParallelRanks):
    ctx: DistContext
    layout: ParallelLayout

    @classmethod
    def from_env(cls, device: str | torch.device | None, ep: int = 0,
                 timeout_s: float | None = None) -> "DistTraining | None":
        """A session when started by torchrun, else None (nothing is initialised)."""
        if not in_torchrun():
            if ep:
                raise ConfigError(f"--ep {ep} needs a distributed run: start with "
                                  f"`torchrun --nproc-per-node N -m dsmoe train ...`")
            return None
        return cls(init(device, timeout_s), ParallelLayout(ep=ep))

    @classmethod
    def single(cls, device: str | torch.device | None) -> "DistTraining":
        """One rank without torchrun: continues a run whose checkpoints are sharded."""
        return cls(init_single(device), ParallelLayout())

    def prepare(self, model: nn.Module) -> nn.Module:
        return parallelize(model, self.layout, self.ctx)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm, self.ctx)

    def full_model(self, checkpoint: str | Path) -> nn.Module | None:
        """On rank 0, the single-device model consolidated from a sharded checkpoint (for
        the Hugging Face export); None on the other ranks."""
        return dcp_ckpt.load_model(checkpoint) if self.is_main else None

    # ------------------------------------------------------------- checkpoints
    def save(self, root: str | Path, step: int, model: nn.Module, optimizer, extra: dict[str, Any],
             meta: dict[str, Any] | None = None, keep_last: int = 3) -> Path:
        from dsmoe.train import checkpoint as train_ckpt

        root = Path(root)
        final = train_ckpt.checkpoint_dir(root, step)

        def make_folder() -> str | None:
            if not self.is_main:
                return None
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(final)
            return str(make_temp_dir(final))

        what = f"saving the checkpoint of step {step} in {root}"
        tmp = Path(dcp_ckpt.on_every_rank(self.ctx, what, make_folder)[0])
        try:
            dcp_ckpt.save(tmp, model, optimizer, self.ctx, {**extra, "step": step})

            def finish() -> None:  # every rank's shards and their checksums are on disk
                if not self.is_main:
                    return
                record = {"format": train_ckpt.FORMAT, "version": train_ckpt.VERSION, "step": step,
                          "layout": DCP_LAYOUT, "world_size": self.ctx.world_size,
                          "ep": self.layout.resolve(self.ctx.world_size, model.args.n_routed_experts).ep,
                          **(meta or {})}
                text = (json.dumps(record, indent=2) + "\n").encode()
                write_synced(tmp / train_ckpt.META_FILE, lambda f: f.write(text))
                swap_into_place(tmp, final)
                for _, old in train_ckpt.list_checkpoints(root)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)

            dcp_ckpt.on_every_rank(self.ctx, what, finish)
        except BaseException as err:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, CheckpointError):
                raise CheckpointError(f"{err}. The earlier checkpoints in {root} are intact; fix the "
                                      f"cause (free disk space) and resume with --resume") from err
            raise
        return final

    def load(self, path: str | Path, model: nn.Module, optimizer) -> dict[str, Any]:
        path = Path(path)
        if not dcp_ckpt.is_dcp_checkpoint(path):
            raise CheckpointError(f"{path} was written by a single-process run; resume it "
                                  f"without torchrun (a distributed run resumes only from the "
                                  f"sharded checkpoints a distributed run writes)")
        return dcp_ckpt.load(path, model, optimizer, self.ctx)

    def close(self) -> None:
        shutdown()

    def __enter__(self) -> "DistTraining":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_distributed_checkpoint(path: str | Path) -> bool:
    return dcp_ckpt.is_dcp_checkpoint(path)


class NullLog:
    """What ranks other than 0 log: nothing (rank 0 logs the averaged metrics)."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
