"""Pretraining: the loop behind `dsmoe train` (DeepSeek-V3 report §2.1.2, §2.2, §4.2).

    dsmoe train --preset small --data out/data --out out/run --steps 2000 [--resume]
    dsmoe train --config run.json --data out/data --out out/run --steps 2000

One optimizer step = `grad_accum` micro-batches of `batch_size` windows of `seq_len + 1`
tokens from the prepared shards (rows drawn by domain token share, or by the shares of a
config's `curriculum`: curriculum.py). The objective per micro-batch is
    L = CE(main) + λ/D · Σ_k CE_k(MTP) + balance loss,
where MTP depth k (1..D) predicts t_{i+k+1} at positions i < T-k: the window's last k
positions have no depth-k target, as in DeepSeek-V3 (no extra tokens are fed, so the
main model never runs past `seq_len`). After the optimizer step, `Balancer.step()` moves
every gate's selection bias by the sign rule from the loads of all that step's
micro-batches (`balance.py`).

Notable:
- Exact resume: the batch stream is a pure function of (seed, step), the schedule a pure
  function of the step, and the checkpoint holds model (with the gate biases), optimizer,
  data position and every RNG state; metrics logged after the checkpoint by a killed
  run are dropped on resume. On CPU a resumed run's losses equal, bit for bit, those of
  a run never interrupted (`tests/train/test_pretrain_loop.py`, the SIGKILL test).
- Single-device code: what a torchrun run does differently (its rows of the batch, summed
  loads, the global gradient norm, sharded checkpoints) is asked of a session object,
  `LocalTraining` (`session.py`) or `DistTraining` (`dsmoe/parallel/training.py`).
- Nothing is lost on bad input: data, tokenizer and config are checked before the model
  is built; `--resume` with different settings is refused with the difference shown; a
  NaN/Inf loss or gradient stops the run before the optimizer step, naming the step and
  the last good checkpoint; a failed checkpoint write leaves the previous one intact.
- Per step the JSONL log (`metrics.jsonl`, `run_dir.py`) gets loss, MTP loss, balance loss, lr, grad
  norm, tokens/s and MaxVio per MoE layer; every `eval_interval` steps, validation loss
  per domain. TensorBoard gets the same when it is installed.
- The output head runs fused with its cross-entropy (`head_loss.py`, handed to
  `Transformer.run` as its `head_loss`): no step stores the logits.
- Device and dtype come from `dsmoe/device.py`: fp32 on CPU, bf16 autocast over fp32
  master weights on CUDA.
Not here: data preparation (`dsmoe/data/`), distributed training (`dsmoe/parallel/`), SFT/RL.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from dsmoe.config import ModelArgs
from dsmoe.device import autocast, resolve_device
from dsmoe.model import Transformer
from dsmoe.train import checkpoint as ckpt
from dsmoe.train.balance import Balancer
from dsmoe.train.config import TrainConfig, load_run_config
from dsmoe.train.curriculum import CurriculumStream
from dsmoe.train.head_loss import head_cross_entropy
from dsmoe.train.optim import (Diverged, TrainingDiverged, build_optimizer, check_finite, finish_step,
                               lr_at, set_lr)
from dsmoe.train.run_dir import (CHECKPOINTS, HF_DIR, MetricsLog, Progress, check_fresh,
                                 export_hf, open_training_shards, resume_point,
                                 run_record, start_run_dir)
from dsmoe.train.session import LocalTraining, cpu_threads, one_process_session, seed_everything

if TYPE_CHECKING:
    from dsmoe.parallel.training import DistTraining

@dataclass
class TrainResult:
    out: Path
    step: int
    metrics: list[dict] = field(default_factory=list)  # this process's step records
    val: dict[str, float] = field(default_factory=dict)  # last validation loss per domain
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    stopped_early: bool = False


# ------------------------------------------------------------------------ losses
def lm_losses(out, tokens_BW: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main next-token CE and mean MTP CE over depths for inputs tokens[:, :T]: from the
    logits, or from `head_losses` when the model ran with `next_token_losses` as its head.
    The MTP depths may cover the first rows only (`mtp_fraction`)."""
    if out.logits is None:
        main, *mtp = out.head_losses
    else:
        main = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens_BW[:, 1:T + 1].flatten())
        mtp = [F.cross_entropy(logits.flatten(0, 1).float(),
                               tokens_BW[:logits.shape[0], k + 1:T + 1].flatten())
               for k, logits in enumerate(out.mtp_logits, start=1)]
    return main, (torch.stack(mtp).mean() if mtp else None)


def next_token_losses(tokens_BW: torch.Tensor, T: int):
    """The `head_loss` of `Transformer.run` for inputs tokens[:, :T]: depth k's states
    (k = 0 the main model's; the first rows of the batch, as many as the states have)
    against the tokens k + 1 ahead, through the output head fused with the cross-entropy
    (`head_loss.py`): the logits are never stored."""
    def loss(depth: int, x_BTD: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
        target_N = tokens_BW[:x_BTD.shape[0], depth + 1:T + 1].flatten()
        return head_cross_entropy(x_BTD.flatten(0, 1), head.weight, target_N)
    return loss


@torch.no_grad()
def evaluate(model: Transformer, shards, domains: list[str], batch_size: int, seq_len: int,
             max_batches: int, device: torch.device) -> dict[str, float]:
    """Mean next-token CE (nats/token) of the main model on each domain's validation split."""
    from dsmoe.data.shards import val_batches
    was_training = model.training
    model.eval()
    losses = {}
    for domain in domains:
        total, count = 0.0, 0
        for batch in val_batches(shards, domain, batch_size, seq_len, max_batches):
            batch = batch.to(device)
            with autocast(device):
                logits = model(batch[:, :seq_len])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                           reduction="sum"))
            count += batch[:, 1:].numel()
        losses[domain] = total / count
    model.train(was_training)
    return losses


# ------------------------------------------------------------------------- train
def train_step(model: Transformer, optimizer, balancer: Balancer, stream, cfg: TrainConfig,
               step: int, device: torch.device, ckpt_root: Path | None,
               session: LocalTraining | DistTraining | None = None) -> dict[str, Any]:
    """One optimizer step (0-based `step`) over `grad_accum` micro-batches: its metrics.
    Under torchrun (`session` a DistTraining) this rank computes its rows of the global batch."""
    t0 = time.perf_counter()
    session = session or LocalTraining(device)
    diverged = _diverged(step + 1, ckpt_root)
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    T, n = cfg.seq_len, cfg.grad_accum
    use_mtp = model.args.n_mtp_layers > 0 and cfg.mtp_lambda > 0
    sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
    for _ in range(n):
        batch = session.local(next(stream).to(device))
        with autocast(device):
            B = batch.shape[0]
            mtp_rows = max(1, round(cfg.mtp_fraction * B))
            output = model.run(batch[:, :T], mtp=use_mtp, mtp_rows=mtp_rows,
                               head_loss=next_token_losses(batch, T))
            main, mtp = lm_losses(output, batch, T)
            bal = balancer.loss(output.routing + output.mtp_routing,
                                [B] * len(output.routing) + [mtp_rows] * len(output.mtp_routing))
            total = main
            if mtp is not None:
                total = total + cfg.mtp_lambda * mtp
            if bal is not None:
                total = total + bal
        check_finite("loss", float(total.detach()), diverged)
        (total / n).backward()
        for key, part in (("loss", main), ("mtp_loss", mtp), ("balance_loss", bal)):
            sums[key] += float(part.detach()) / n if part is not None else 0.0
    grad_norm = finish_step(optimizer, model, cfg.clip, diverged, session.clip_grad_norm_)
    maxvio = balancer.step()  # the bias update, from all micro-batches' loads
    done = step + 1
    return {"step": done, **session.average(sums), "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": cfg.tokens_per_step / (time.perf_counter() - t0),
            "tokens": done * cfg.tokens_per_step, "maxvio": maxvio}


def train(args: ModelArgs, cfg: TrainConfig, data: str | Path, out: str | Path, *,
          resume: bool = False, progress: bool | None = None, export: bool = True,
          on_step: Callable[[dict], None] | None = None,
          session: LocalTraining | DistTraining | None = None) -> TrainResult:
    """Pretrain `args` on the prepared data in `data`, writing everything under `out`.

    progress: a progress bar (None: only on a terminal); without one, a plain line every
    `log_interval` steps. on_step: called with each step's metrics record.
    session: the torchrun session (`dsmoe/parallel/training.py`): the model is sharded over
    its ranks, each computes its rows of the same global batch, rank 0 logs; None: one
    process (`dsmoe/train/session.py`).
    """
    cfg.check_model(args)
    shards = open_training_shards(data, args, cfg)
    out, ckpt_root = Path(out), Path(out) / CHECKPOINTS
    record = run_record(args, cfg, shards)
    latest = resume_point(out, record) if resume else check_fresh(out)
    device = resolve_device(cfg.device)
    with contextlib.ExitStack() as stack:
        session = session or stack.enter_context(one_process_session(latest, device))
        session.check(record, cfg.batch_size)
        stack.enter_context(cpu_threads(cfg.threads, device))
        model, optimizer, balancer, stream, start = _start(args, cfg, shards, latest, device, session)
        out.mkdir(parents=True, exist_ok=True)
        if session.is_main:
            start_run_dir(out, record, resumed=latest is not None)
        result = TrainResult(out=out, step=start, checkpoint=latest)
        with _open_log(out, start, latest is not None, session) as log, \
                contextlib.closing(Progress(cfg, start, progress, quiet=not session.is_main)) as shown:
            began = time.perf_counter()
            for step in range(start, cfg.steps):
                metrics = train_step(model, optimizer, balancer, stream, cfg, step, device, ckpt_root, session)
                done = result.step = metrics["step"]
                log.write(metrics)
                result.metrics.append(metrics)
                if on_step is not None:
                    on_step(metrics)
                shown.step(metrics)
                out_of_time = 0 < cfg.max_seconds <= time.perf_counter() - began
                last = done == cfg.steps or out_of_time
                if (cfg.eval_interval and done % cfg.eval_interval == 0) or last:
                    result.val = evaluate(model, shards, shards.domains, cfg.batch_size,
                                          cfg.seq_len, cfg.eval_batches, device)
                    log.write({"step": done, "val": result.val})
                    shown.validation(done, result.val)
                if (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or last:
                    result.checkpoint = session.save(ckpt_root, done, model, optimizer, _resume_state(
                        stream, done, cfg), {"run": record}, cfg.keep_last)
                if out_of_time and done < cfg.steps:
                    result.stopped_early = True
                    shown.say(f"stopping at step {done}: max_seconds={cfg.max_seconds} reached")
                    break
        full = session.full_model(result.checkpoint) if export else None  # rank 0's, whole
        if full is not None:
            result.hf_dir = export_hf(full, out / HF_DIR, shards.tokenizer())
    return result


def _start(args: ModelArgs, cfg: TrainConfig, shards, latest: Path | None, device, session):
    """Model (prepared by the session), optimizer, balancer and batch stream, seeded, and
    restored from `latest` when resuming; with the step to start from."""
    from dsmoe.data.shards import BatchStream
    seed_everything(cfg.seed)
    model = session.prepare(Transformer(args).to(device).train())
    optimizer = build_optimizer(model, cfg)
    balancer = Balancer(model.moe_layers(), cfg.balance, cfg.gamma, cfg.alpha, cfg.aux_alpha,
                        reduce=session.reduce_loads)
    stream = (CurriculumStream(shards, cfg.curriculum, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.domains)
              if cfg.curriculum else
              BatchStream(shards, "train", cfg.batch_size, cfg.seq_len, cfg.seed, cfg.domains))
    start = 0
    if latest is not None:  # weights, optimizer, RNG states (session.load), data position
        state = session.load(latest, model, optimizer)
        stream.load_state_dict(state["data"])
        start = int(state["step"])
    return model, optimizer, balancer, stream, start


def _resume_state(stream, step: int, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint holds besides weights, optimizer and RNG states."""
    return {"data": stream.state_dict(), "schedule": {"name": cfg.schedule, "lr": lr_at(step, cfg)}}


@contextlib.contextmanager
def _open_log(out: Path, start: int, resumed: bool, session):
    """metrics.jsonl on the main process (others log nothing), without what a killed run
    logged after its last checkpoint."""
    log = MetricsLog(out) if session.is_main else _parallel().NullLog()
    try:
        if resumed:
            log.truncate_after(start)
        yield log
    finally:
        log.close()


def _diverged(step: int, ckpt_root: Path | None) -> Diverged:
    """The error for a NaN/Inf at `step`: it names the last good checkpoint to resume from."""
    def error(what: str, value: float) -> TrainingDiverged:
        last = ckpt.latest_checkpoint(ckpt_root) if ckpt_root is not None else None
        kept = (f"the last good checkpoint is {last} (step {ckpt.read_meta(last)['step']}), "
                f"resume from it with --resume after lowering lr or clip in the config"
                if last else "no checkpoint was written before it; lower lr or clip and start again")
        return TrainingDiverged(f"the {what} is {value} at step {step}; training stopped before "
                                f"updating the weights and {kept}")
    return error


def _parallel():
    """dsmoe.parallel.training, imported only by runs that need it."""
    import dsmoe.parallel.training
    return dsmoe.parallel.training


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="model preset (tiny, small, ...)")
    parser.add_argument("--config", help="run config JSON: training settings, and optionally "
                                         "\"model\" (a preset name or ModelArgs fields)")
    parser.add_argument("--data", required=True, help="prepared data directory (dsmoe prepare)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, hf/")
    parser.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")
    _parallel().add_arguments(parser)  # --ep, --dist-timeout: read only under torchrun


def run(args: argparse.Namespace) -> int:
    model_args, cfg = load_run_config(args.preset, args.config, steps=args.steps)
    session = _parallel().session_from_env(cfg.device, args.ep, args.replicate,
                                           args.dist_timeout)  # None: no torchrun
    with session or contextlib.nullcontext():
        result = train(model_args, cfg, args.data, args.out, resume=args.resume,
                       progress=False if args.no_progress else None, session=session)
    if session is None or session.is_main:
        print(f"trained {result.step} steps; checkpoint {result.checkpoint}; "
              f"Hugging Face model {result.hf_dir}")
    return 0
