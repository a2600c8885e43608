"""One rank of the multi-process tests (started by `spawn` in conftest.py); `reference()`
is the single-process run they are compared with.

Each rank runs the training loop's own `train_step` with `DistTraining`, as `torchrun -m
dsmoe train` does, on its rows of fixed global batches. Scenarios: train (with `--save-at`,
a checkpoint after that step, in the loop's layout under `--ckpt`), resume (from the
latest checkpoint there, the remaining steps), mismatch (rank 1 builds another config),
lost (rank 1 exits) and stalled (rank 1 stops talking): in the last two the other rank
must fail, at the latest when the process-group timeout expires; save_fails (a save
that fails on one rank: every rank must stop at once, the earlier checkpoint intact).
Each rank writes what it saw to OUT/rank{R}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.train.balance import Balancer
from dsmoe.train.config import TrainConfig
from dsmoe.train.optim import build_optimizer
from dsmoe.train.pretrain import train_step

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 4
# The loop's own settings and step: main CE + 0.3 MTP CE + sequence-wise balance loss,
# fused AdamW with its parameter groups, clipping at 1.0, the aux-free bias update.
CFG = TrainConfig(batch_size=GLOBAL_BATCH, seq_len=SEQ - 1, lr=1e-2, warmup_steps=0,
                  schedule="constant", threads=1)
METRICS = ("loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio")


def batches(args: ModelArgs) -> list[torch.Tensor]:
    """Global batches of SEQ = seq_len + 1 tokens (inputs and next-token targets)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, args.vocab_size, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def build(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(args)


def trainer(model, reduce=None):
    return build_optimizer(model, CFG), Balancer(model.moe_layers(), CFG.balance, CFG.gamma,
                                                 CFG.alpha, CFG.aux_alpha, reduce=reduce)


def run_steps(model, optimizer, balancer, args, first: int, last: int, root, par=None,
              save_at: int = 0, on_save=None) -> list[dict]:
    """Steps first..last-1 (0-based) of the run; the metrics of each."""
    stream = iter(batches(args)[first:])
    out = []
    for step in range(first, last):
        m = train_step(model, optimizer, balancer, stream, CFG, step, torch.device("cpu"), root, par)
        out.append({k: m[k] for k in ("step", *METRICS)})
        if save_at == step + 1 and on_save is not None:
            on_save(step + 1)
    return out


def probe(args: ModelArgs) -> torch.Tensor:
    return torch.arange(16).view(2, 8) * 31 % args.vocab_size


def biases(model) -> list[list[float]]:
    return [moe.gate.bias.tolist() for moe in model.moe_layers()]


def reference(args: ModelArgs, steps: int = STEPS) -> tuple[list[dict], Transformer]:
    """The single-process run on the global batches."""
    model = build(args)
    optimizer, balancer = trainer(model)
    metrics = run_steps(model, optimizer, balancer, args, 0, steps, None)
    return metrics, model


def failing_saves(par, model, optimizer, root: str) -> dict:
    """A good save of step 1, then saves of step 1 that fail on one rank: in DCP's shard
    writing (rank 1, disk full) and after it (rank 0 writing meta.json). Per attempt: the
    error each rank saw, how long it took, and what the checkpoint folder then holds."""
    import errno
    from pathlib import Path

    import torch.distributed.checkpoint.filesystem as dcp_fs

    import dsmoe.parallel.training as training
    from dsmoe.train.checkpoint import checkpoint_dir, list_checkpoints

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    attempts = {}
    for name, rank, module, attr in [("good", None, None, None),
                                     ("shards", 1, dcp_fs, "_write_item"),
                                     ("meta", 0, training, "write_synced")]:
        real = getattr(module, attr) if module is not None else None
        if rank == par.ctx.rank:
            setattr(module, attr, full)
        t0 = time.monotonic()
        try:
            par.save(root, 1, model, optimizer, {"data": {"step": 1}})
            attempts[name] = {"error": None}
        except Exception as err:
            attempts[name] = {"error": type(err).__name__, "message": str(err)}
        attempts[name]["seconds"] = time.monotonic() - t0
        if module is not None:
            setattr(module, attr, real)
        attempts[name]["folder"] = sorted(p.name for p in Path(root).iterdir())
        attempts[name]["steps"] = [s for s, _ in list_checkpoints(root)]
    first = par.load(checkpoint_dir(root, 1), model, optimizer)  # the good save, verified
    attempts["loaded_step"] = first["step"]
    return attempts


def main() -> None:
    from dsmoe.parallel import launch
    from dsmoe.parallel.parallelize import ParallelLayout
    from dsmoe.parallel.training import DistTraining
    from dsmoe.train.checkpoint import latest_checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["train", "resume", "mismatch", "lost", "stalled", "save_fails"])
    p.add_argument("out")
    p.add_argument("--ep", type=int, default=0)
    p.add_argument("--ckpt", default="")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    ctx = launch.init("cpu", timeout_s=a.timeout)
    report: dict = {"rank": ctx.rank}
    try:
        args = ModelArgs.from_preset("tiny")
        if a.scenario == "mismatch" and ctx.rank == 1:
            args = ModelArgs.from_dict({**args.__dict__, "route_scale": 1.0})
        if a.scenario in ("lost", "stalled"):
            if ctx.rank == 1 and a.scenario == "lost":
                os._exit(3)
            if ctx.rank == 1:
                time.sleep(120)  # alive but silent: only the timeout can tell
            t0 = time.monotonic()
            try:
                launch.agree(ctx, "model config", args.__dict__)
            finally:
                report["waited_s"] = time.monotonic() - t0
        par = DistTraining(ctx, ParallelLayout(ep=a.ep))
        model = par.prepare(build(args))
        optimizer, balancer = trainer(model, par.reduce_loads)
        first = 0
        if a.scenario == "resume":
            first = par.load(latest_checkpoint(a.ckpt), model, optimizer)["step"]

        def save(step: int) -> None:
            par.save(a.ckpt, step, model, optimizer, {"data": {"step": step}})
            with torch.no_grad():  # what the saved weights compute, for consolidation
                report["probe_logits"] = model(probe(args)).tolist()

        if a.scenario == "save_fails":
            report["attempts"] = failing_saves(par, model, optimizer, a.ckpt)
        else:
            metrics = run_steps(model, optimizer, balancer, args, first, STEPS, a.ckpt or None, par,
                                a.save_at, save)
            report.update(metrics=metrics, biases=biases(model), first=first)
    except Exception as err:  # reported to the test, which checks the kind and message
        report.update(error=type(err).__name__, message=str(err), trace=traceback.format_exc())
    with open(os.path.join(a.out, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(report, f)
    if "error" not in report:
        launch.shutdown()
    sys.stdout.flush()
    os._exit(0)  # do not wait on a peer that is gone


if __name__ == "__main__":
    main()
