"""The fine-tuning loop shared by `dsmoe sft`, `esft` and `expand`, and their model in/out.

Every fine-tuning command reads a Hugging Face checkpoint directory (`--model`), trains on
packed examples (`packing.py`: loss only where the example's mask says, attention reset
per example) and writes a checkpoint directory (`--out`) with the tokenizer and its chat
template. The loop reuses the pretraining pieces: AdamW groups and schedules (`optim.py`),
the balancer (`balance.py`), the settings dataclass (`TrainConfig`), device and autocast
(`dsmoe/device.py`). What differs from pretraining: the masked loss over packed rows, no
MTP loss (see packing.py), and optional row freezing (`freeze.py`) applied at the two
points of the step where it must act.

Nothing half-written: the output directory is assembled in a hidden sibling and renamed
into place only when complete (the same swap `dsmoe prepare` uses), so a failure at any
point leaves the previous `--out` (or nothing) behind. Settings and data are checked
before the first training step, and nothing is written before the last.
Not here: resumable checkpoints (fine-tuning runs are short; rerun instead), data
parallelism (`dsmoe/parallel/`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dsmoe.atomic import replacing_dir
from dsmoe.device import add_device_arguments, autocast, resolve_device
from dsmoe.errors import CheckpointError, DataError
from dsmoe.train.balance import Balancer
from dsmoe.train.config import TrainConfig
from dsmoe.train.freeze import RowFreeze
from dsmoe.train.optim import TrainingDiverged, build_optimizer, check_finite, finish_step, lr_at, set_lr
from dsmoe.train.packing import Example, PackedBatch, PackedStream, collate, masked_lm_loss, pack_rows
from dsmoe.train.run_dir import METRICS_FILE
from dsmoe.train.session import seed_everything

REPORT_FILE = "training_report.json"


# ------------------------------------------------------------------- model in / out
def check_out(out: str | Path) -> Path:
    """Refuse an `--out` that exists and is not a checkpoint directory we may replace."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "config.json").is_file())):
        raise CheckpointError(f"{out} exists and is not a model directory; choose a new or "
                              "empty --out directory")
    return out


def load_model(path: str | Path, device: torch.device):
    """(model in fp32 master weights, tokenizer) for training; the tokenizer is required."""
    from dsmoe.interop.hf import load_model_dir

    model, tokenizer = load_model_dir(path, dtype=torch.float32, device=device)
    if tokenizer is None:
        raise DataError(f"{path} has no tokenizer.json: fine-tuning needs the model's tokenizer "
                        "(save the model with its tokenizer, or copy tokenizer.json and "
                        "tokenizer_config.json into it)")
    return model, tokenizer


def save_model_dir(model, tokenizer, out: str | Path, report: dict[str, Any],
                   metrics: list[dict] | None = None) -> Path:
    """Write the checkpoint (weights, config, tokenizer with chat template), the report and
    the metrics into a hidden sibling, then swap it into place."""
    from dsmoe.interop.hf import save_hf

    out = check_out(out)
    with replacing_dir(out, CheckpointError) as tmp:  # a full disk: CheckpointError, old --out kept
        save_hf(model, tmp, tokenizer=tokenizer)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if metrics is not None:
            (tmp / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return out


# --------------------------------------------------------------------------- CLI
def add_arguments_common(parser: argparse.ArgumentParser, steps: int, lr: float,
                         batch_size: int = 8) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the model: a Hugging Face checkpoint directory with its tokenizer")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where to write the trained model (a checkpoint directory)")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"rows per step (default {batch_size})")
    parser.add_argument("--seq-len", type=int, default=0,
                        help="positions per row (default: the model's context, at most 512)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser, threads=True)


def train_config(args: argparse.Namespace, model_args, **settings: Any) -> TrainConfig:
    """The TrainConfig of a fine-tuning command: its arguments (`--seq-len 0`: the model's
    context up to 512) plus the command's settings, checked against the model."""
    steps = args.steps
    values = dict(steps=steps, batch_size=args.batch_size, lr=args.lr,
                  seq_len=args.seq_len or min(512, model_args.max_seq_len),
                  seed=args.seed, device=args.device, threads=args.threads,
                  warmup_steps=max(1, min(steps // 10, 20)), min_lr_ratio=0.1, weight_decay=0.0,
                  eval_interval=0, ckpt_interval=0, log_interval=max(1, steps // 10))
    values.update(settings)
    cfg = TrainConfig(**values)
    cfg.check_model(model_args)
    return cfg


def prepare_run(device: str = "auto", threads: int = 0, seed: int = 0) -> torch.device:
    """Device, CPU threads and seeds, set once before the model is loaded."""
    device = resolve_device(device)
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    seed_everything(seed)
    return device


# ------------------------------------------------------------------------ evaluation
def packed_batches(examples: list[Example], seq_len: int, batch_size: int, pad_id: int = 0,
                   max_rows: int | None = None) -> list[PackedBatch]:
    """Examples packed once, in order, into a fixed list of batches (the first `max_rows`
    rows): held-out sets, and the task sample ESFT and expansion measure routing on."""
    rows, _ = pack_rows(examples, seq_len)
    rows = rows[:max_rows]
    return [collate(examples, rows[i:i + batch_size], seq_len, pad_id)
            for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def eval_loss(model, batches: list[PackedBatch]) -> float:
    """Mean cross-entropy (nats per target token) over packed batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            logits = model.run(batch.inputs_BT, batch.layout(), attn_impl="naive").logits
        n = batch.n_targets
        total += float(masked_lm_loss(logits, batch.targets_BT, batch.loss_mask_BT)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def eval_losses(model, sets: dict[str, list[PackedBatch]]) -> dict[str, float]:
    return {name: eval_loss(model, batches) for name, batches in sets.items()}


def format_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in losses.items())


# ----------------------------------------------------------------------------- loop
def finetune(model, stream: PackedStream, cfg: TrainConfig, *, freeze: RowFreeze | None = None,
             evals: dict[str, list[PackedBatch]] | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Train `model` in place for cfg.steps steps; returns one metrics record per step
    (plus `val` records every cfg.eval_interval steps when `evals` are given)."""
    device = next(model.parameters()).device
    model.train()
    optimizer = build_optimizer(model, cfg)
    balancer = Balancer(model.moe_layers(), cfg.balance, cfg.gamma, cfg.alpha, cfg.aux_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    records: list[dict] = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        diverged = _diverged(step + 1)
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        loss_sum, tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = next(stream).to(device)
            with autocast(device):
                out = model.run(batch.inputs_BT, batch.layout(), attn_impl="naive")
                loss = masked_lm_loss(out.logits, batch.targets_BT, batch.loss_mask_BT)
                bal = balancer.loss(out.routing, batch.inputs_BT.shape[0])
                total = loss if bal is None else loss + bal
            check_finite("loss", float(total.detach()), diverged)
            (total / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            tokens += batch.n_targets
        if freeze is not None:
            freeze.zero_grads()
        grad_norm = finish_step(optimizer, params, cfg.clip, diverged)
        maxvio = balancer.step()
        if freeze is not None:
            freeze.restore()  # after the balancer too: it moves the gate biases
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                  "target_tokens": tokens, "seconds": time.perf_counter() - t0,
                  "maxvio": max(maxvio) if maxvio else 0.0}
        records.append(record)
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.steps:
            log(f"step {done}/{cfg.steps} loss {loss_sum:.4f} lr {lr:.2e} grad_norm "
                f"{grad_norm:.3f} MaxVio {record['maxvio']:.3f}")
        if evals and cfg.eval_interval and done % cfg.eval_interval == 0 and done < cfg.steps:
            val = eval_losses(model, evals)
            records.append({"step": done, "val": val})
            log(f"step {done}: held-out loss {format_losses(val)}")
    model.eval()
    return records


def _diverged(step: int):
    def error(what: str, value: float) -> TrainingDiverged:
        return TrainingDiverged(f"the {what} is {value} at step {step}; nothing was written: "
                                "lower --lr and run again")
    return error
