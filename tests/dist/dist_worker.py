"""One rank of the multi-process tests (started by `spawn` in conftest.py, or run with
no distributed environment as the single-process reference).

Scenarios: train (optionally saving a checkpoint after `--save-at` steps), resume (load
a checkpoint, train the remaining steps), mismatch (rank 1 builds another config), lost
(rank 1 exits) and stalled (rank 1 stops talking): the others must fail, at the latest
when the process-group timeout expires. Each rank writes
what it saw to OUT/rank{R}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from dsmoe import ModelArgs, Transformer
from dsmoe.train.balance import Balancer
from dsmoe.train.config import TrainConfig
from dsmoe.train.optim import build_optimizer

GLOBAL_BATCH, SEQ, STEPS, LR = 4, 16, 4, 1e-2


def batches(args: ModelArgs) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, args.vocab_size, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def build(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(args)


def step(model, optimizer, balancer, tokens, clip=None) -> float:
    """Next-token CE plus MTP CE plus the sequence-wise balance loss, one AdamW step, then
    the aux-free bias update (on loads summed over ranks when the balancer reduces)."""
    out = model.run(tokens, mtp=True)
    V = out.logits.shape[-1]
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    for k, logits in enumerate(out.mtp_logits, start=1):
        loss = loss + 0.3 * F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, k + 1:].reshape(-1))
    loss = loss + balancer.loss(out.routing + out.mtp_routing, tokens.shape[0])
    loss.backward()
    clip() if clip else torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    balancer.step()
    return loss.item()


def optimizer_and_balancer(model, reduce=None):
    cfg = TrainConfig(lr=LR, warmup_steps=0, schedule="constant", weight_decay=0.1)
    return build_optimizer(model, cfg), Balancer(model.moe_layers(), "bias", gamma=1e-3, alpha=1e-4,
                                                  reduce=reduce)


def probe(args: ModelArgs) -> torch.Tensor:
    return torch.arange(16).view(2, 8) * 31 % args.vocab_size


def biases(model) -> list[list[float]]:
    return [moe.gate.bias.tolist() for moe in model.moe_layers()]


def reference(args: ModelArgs, steps: int = STEPS) -> tuple[list[float], Transformer]:
    model = build(args)
    opt, balancer = optimizer_and_balancer(model)
    return [step(model, opt, balancer, t) for t in batches(args)[:steps]], model


def main() -> None:
    from dsmoe.dist import checkpoint, launch
    from dsmoe.dist.parallelize import ParallelLayout, clip_grad_norm_, parallelize

    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["train", "resume", "mismatch", "lost", "stalled"])
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
        model = parallelize(build(args), ParallelLayout(ep=a.ep), ctx)
        opt, balancer = optimizer_and_balancer(model, ctx.all_reduce_sum)
        W, r = ctx.world_size, ctx.rank
        first = 0
        if a.scenario == "resume":
            first = checkpoint.load(a.ckpt, model, opt, ctx)["step"]
        losses = []
        for i, tokens in enumerate(batches(args)[first:], start=first):
            local = tokens[r * GLOBAL_BATCH // W:(r + 1) * GLOBAL_BATCH // W]
            loss = step(model, opt, balancer, local, lambda: clip_grad_norm_(model, 1.0, ctx))
            losses.append(ctx.mean(loss))
            if a.save_at and i + 1 == a.save_at:
                checkpoint.save(a.ckpt, model, opt, ctx, {"step": i + 1})
                with torch.no_grad():  # what the saved weights compute, for consolidation
                    report["probe_logits"] = model(probe(args)).tolist()
        report.update(losses=losses, biases=biases(model), first=first)
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
