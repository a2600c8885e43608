"""Joining a torch.distributed job: detect torchrun's environment, start the process group.

Notable:
- Nothing global: `init()` returns a `DistContext` (rank, world size, device, backend) that
  is passed to whoever needs it; the model never sees it.
- Backend follows the device chosen in `dsmoe/device.py`: nccl on CUDA (one GPU per
  process, `LOCAL_RANK`), gloo on CPU.
- Every collective has a deadline (`timeout_s`, default `DEFAULT_TIMEOUT_S`, or the
  `DSMOE_DIST_TIMEOUT` environment variable): a rank that dies makes the others fail
  with an error instead of waiting forever.
- `agree()` compares a value (the model config, the layout, the training config) across
  ranks before any work and names the ranks that differ.
Not here: spawning processes (torchrun does it) or elastic membership changes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dsmoe.device import resolve_device
from dsmoe.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "DSMOE_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks, in place and returned (e.g. per-expert loads before the
        bias update, so that every rank applies the same one)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, value: float | torch.Tensor) -> float:
        """The average over ranks of a per-rank scalar (a loss for logging)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t) / self.world_size


def in_torchrun() -> bool:
    """True when started by torchrun (or anything setting the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun would give local rank `rank` (benchmarks and tests start their
    ranks themselves, without torchrun's agent)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timeout_from_env(default: float = DEFAULT_TIMEOUT_S) -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return value


def init(device: str | torch.device | None = None, timeout_s: float | None = None) -> DistContext:
    """Start the process group from torchrun's environment variables."""
    if not in_torchrun():
        raise ConfigError("no distributed environment: start with "
                          "`torchrun --nproc-per-node N -m dsmoe ...` (RANK/WORLD_SIZE unset)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return _start(device, rank, world, local_rank, timeout_s, store=None)


def init_single(device: str | torch.device | None = None) -> DistContext:
    """A process group of one, without torchrun: lets a plain process read and continue a
    sharded checkpoint written by many."""
    return _start(device, 0, 1, 0, None, store=dist.HashStore())


def _start(device, rank: int, world: int, local_rank: int, timeout_s: float | None, store) -> DistContext:
    timeout_s = timeout_from_env() if timeout_s is None else timeout_s
    device = resolve_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        extra = {} if store is None else {"store": store, "rank": rank, "world_size": world}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None, **extra)
    return DistContext(rank, world, local_rank, device, backend, timeout_s)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(ctx: DistContext, what: str, value: Any) -> None:
    """Raise ConfigError on every rank unless `value` is the same on all of them."""
    text = json.dumps(value, sort_keys=True, default=str)
    gathered: list[str] = [""] * ctx.world_size
    dist.all_gather_object(gathered, text)
    differ = [r for r, other in enumerate(gathered) if other != gathered[0]]
    if differ:
        detail = ""
        ref, bad = json.loads(gathered[0]), json.loads(gathered[differ[0]])
        if isinstance(ref, dict) and isinstance(bad, dict):
            keys = sorted(k for k in set(ref) | set(bad) if ref.get(k) != bad.get(k))
            detail = f" (fields {keys})"
        raise ConfigError(f"{what} differs between rank 0 and rank(s) {differ}{detail}: "
                          f"start every rank with the same {what}")
